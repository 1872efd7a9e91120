use super::*;

#[test]
fn embedded_default_parses_and_validates() {
    let c = Config::parse(DEFAULT_YAML).unwrap();
    c.validate().unwrap();
    assert_eq!(c.listen.port(), 5000);
    assert_eq!(c.upstreams[0].name, "docker.io");
    assert_eq!(
        c.storage.engines[&c.storage.preference].url,
        "file://./ociedge-data"
    );
}

#[test]
fn unknown_keys_name_their_path() {
    let y = "storage:\n  preference: a\n  engines:\n    a: { url: 'memory://', colour: red }\n";
    let e = Config::parse(y).unwrap_err().0;
    assert!(e.contains("storage.engines.a"), "{e}");
    assert!(e.contains("colour"), "{e}");
}

#[test]
fn bad_values_name_their_path() {
    let y = "storage:\n  preference: a\n  engines:\n    a: { url: 'memory://' }\ncache: { tag_ttl: soon }\n";
    let e = Config::parse(y).unwrap_err().0;
    assert!(e.starts_with("cache.tag_ttl"), "{e}");
    let y = "storage:\n  preference: b\n  engines:\n    a: { url: 'memory://' }\n";
    let e = Config::parse(y).unwrap().validate().unwrap_err().0;
    assert!(e.starts_with("storage.preference"), "{e}");
    let y = "storage:\n  preference: a\n  engines:\n    a: { url: 'ftp://x' }\n";
    let e = Config::parse(y).unwrap().validate().unwrap_err().0;
    assert!(e.starts_with("storage.engines.a.url"), "{e}");
}

#[test]
fn masked_output_round_trips() {
    let y = "storage:\n  preference: a\n  engines:\n    a: { url: 's3://b', options: { secret_access_key: hunter2, region: x } }\nupstreams:\n  - { name: docker.io, url: 'https://r', auth: { username: u, password: pw }, access: public }\n";
    let c = Config::parse(y).unwrap();
    let out = c.to_masked_yaml();
    assert!(!out.contains("hunter2") && !out.contains("pw\n"), "{out}");
    let back = Config::parse(&out).unwrap();
    assert_eq!(back.storage.engines["a"].options["region"], "x");
}

const AUTH_BASE: &str = "storage:\n  preference: a\n  engines:\n    a: { url: 'memory://' }\n";

#[test]
fn auth_section_is_typed_and_validated() {
    let ok = format!("{AUTH_BASE}auth:\n  htpasswd: /etc/h\n  token: {{ signing_key: /etc/k.pem, verify_keys: [/etc/o.pub] }}\n  rules:\n    - {{ repos: 'library/**', pull: [anonymous] }}\n");
    let c = Config::parse(&ok).unwrap();
    c.validate().unwrap();
    assert_eq!(c.auth.as_ref().unwrap().token.ttl.0.as_secs(), 300);
    let cases = [
        ("  colour: red\n", "auth: unknown field `colour`"),
        (
            "  rules:\n    - { repos: 'a/[', pull: [x] }\n",
            "auth.rules[0].repos",
        ),
        (
            "  rules:\n    - { repos: 'a/**', pull: ['a b'] }\n",
            "auth.rules[0].pull[0]",
        ),
        (
            "  rules:\n    - { repos: 'a/**', pul: [x] }\n",
            "auth.rules[0]",
        ),
    ];
    for (extra, want) in cases {
        let y = format!("{AUTH_BASE}auth:\n  token: {{ signing_key: /k }}\n{extra}");
        let e = Config::parse(&y)
            .and_then(|c| c.validate().map(|_| c))
            .unwrap_err()
            .0;
        assert!(e.contains(want), "{want}: {e}");
    }
    let y = format!("{AUTH_BASE}auth:\n  token: {{ signing_key: /k, ttl: 2h }}\n");
    let e = Config::parse(&y).unwrap().validate().unwrap_err().0;
    assert!(e.contains("auth.token.ttl"), "{e}");
}

#[test]
fn access_modes_need_an_auth_section_and_inline_keys_are_masked() {
    let up = |access: &str| {
        format!("{AUTH_BASE}upstreams:\n  - {{ name: ghcr.io, url: 'https://ghcr.io', auth: {{ username: u, password: p }}{access} }}\n")
    };
    for access in ["", ", access: gated", ", access: passthrough"] {
        let e = Config::parse(&up(access))
            .unwrap()
            .validate()
            .unwrap_err()
            .0;
        assert!(
            e.contains("upstreams[0].access") && e.contains("auth:"),
            "{e}"
        );
        let with = format!("{}auth:\n  token: {{ signing_key: /k }}\n", up(access));
        Config::parse(&with).unwrap().validate().unwrap();
    }
    Config::parse(&up(", access: public"))
        .unwrap()
        .validate()
        .unwrap();
    let y = format!("{AUTH_BASE}auth:\n  token:\n    signing_key: |\n      -----BEGIN EC PRIVATE KEY-----\n      c2VjcmV0\n      -----END EC PRIVATE KEY-----\n");
    let c = Config::parse(&y).unwrap();
    c.validate().unwrap();
    let out = c.to_masked_yaml();
    assert!(
        !out.contains("c2VjcmV0") && out.contains("********"),
        "{out}"
    );
    Config::parse(&out).unwrap();
}

#[test]
fn two_upstreams_with_one_storage_prefix_are_refused() {
    let base = "storage:\n  preference: a\n  engines:\n    a: { url: 'memory://' }\nupstreams:\n";
    let y = format!("{base}  - {{ name: docker.io, url: 'https://r' }}\n  - {{ name: 'up.local:5000', url: 'https://u' }}\n  - {{ name: up.local-5000, url: 'https://v' }}\n");
    let e = Config::parse(&y).unwrap().validate().unwrap_err().0;
    assert!(
        e.starts_with("upstreams[2].name") && e.contains("same prefix"),
        "{e}"
    );
}

const MINIMAL: &str = "storage:\n  preference: a\n  engines:\n    a: { url: 'memory://' }\n";

#[test]
fn durations_and_sizes_have_an_upper_bound_named_by_key() {
    for (yaml, key) in [
        ("cache: { tag_ttl: 1001years }\n", "cache.tag_ttl"),
        ("cache: { max_stale: 11years }\n", "cache.max_stale"),
        (
            "limits: { header_read_timeout: 300000000000years }\n",
            "limits.header_read_timeout",
        ),
        ("cache: { max_size: 1025TiB }\n", "cache.max_size"),
        ("cache: { max_size: 100000TiB }\n", "cache.max_size"),
        (
            "cache: { max_size: 18446744073709551615 }\n",
            "cache.max_size",
        ),
    ] {
        let e = Config::parse(&format!("{MINIMAL}{yaml}")).unwrap_err().0;
        assert!(e.starts_with(key), "{yaml}: {e}");
        assert!(e.contains("largest allowed"), "{yaml}: {e}");
    }
    // The bounds themselves are accepted.
    let c = Config::parse(&format!(
        "{MINIMAL}cache: {{ tag_ttl: 10years, max_size: 1024TiB }}\n"
    ))
    .unwrap();
    c.validate().unwrap();
}

#[test]
fn duplicate_keys_are_refused_at_every_level() {
    for yaml in [
        "storage:\n  preference: a\n  engines:\n    a: { url: 'memory://' }\n    a: { url: 'file:///tmp/x' }\n",
        "storage:\n  preference: a\n  engines:\n    a: { url: 'memory://', url: 'file:///x' }\n",
        "region: eu\nregion: us\nstorage:\n  preference: a\n  engines:\n    a: { url: 'memory://' }\n",
        "storage:\n  preference: a\n  engines:\n    a: { url: 'memory://', options: { region: x, region: y } }\n",
    ] {
        let e = Config::parse(yaml).unwrap_err().0;
        assert!(e.contains("duplicate"), "{yaml}: {e}");
    }
}

#[test]
fn deep_nesting_is_refused_quickly() {
    let started = std::time::Instant::now();
    let n = 100_000;
    for (open, close) in [("[", "]"), ("{a: ", "}")] {
        let yaml = format!("{MINIMAL}region: {}1{}\n", open.repeat(n), close.repeat(n));
        let e = Config::parse(&yaml).unwrap_err().0;
        assert!(e.contains("nested deeper"), "{}", &e[..e.len().min(200)]);
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // Brackets in quoted scalars and comments are not nesting.
    let quoted = format!(
        "{MINIMAL}region: eu # {}\nupstreams:\n  - {{ name: docker.io, url: 'https://r/{}' }}\n",
        "[".repeat(200),
        "[".repeat(200)
    );
    Config::parse(&quoted).unwrap();
    // Nor are brackets inside plain scalars, however many lines have them.
    let mut plain = MINIMAL.to_string();
    plain.push_str("upstreams:\n");
    for i in 0..100 {
        plain.push_str(&format!(
            "  - {{ name: r{i}.example, url: https://r{i}/[x }}\n"
        ));
    }
    let e = Config::parse(&plain).err().map(|e| e.0).unwrap_or_default();
    assert!(!e.contains("nested deeper"), "{e}");
}

#[test]
fn upstream_breaker_and_reserve_keys_are_validated() {
    let up = |keys: &str| {
        format!("storage:\n  preference: a\n  engines:\n    a: {{ url: 'memory://' }}\nupstreams:\n  - {{ name: docker.io, url: 'https://r'{keys} }}\n")
    };
    let c = Config::parse(&up("")).unwrap();
    c.validate().unwrap();
    let u = &c.upstreams[0];
    assert_eq!(
        (
            u.down_after,
            u.backoff_max.0.as_secs(),
            u.ratelimit_reserve.0
        ),
        (5, 60, 10.0)
    );
    let c = Config::parse(&up(
        ", down_after: 2, backoff_max: 5m, ratelimit_reserve: 25%",
    ))
    .unwrap();
    c.validate().unwrap();
    let u = &c.upstreams[0];
    assert_eq!(
        (
            u.down_after,
            u.backoff_max.0.as_secs(),
            u.ratelimit_reserve.0
        ),
        (2, 300, 25.0)
    );
    assert_eq!(
        Config::parse(&up(", ratelimit_reserve: 0"))
            .unwrap()
            .upstreams[0]
            .ratelimit_reserve
            .0,
        0.0
    );
    for bad in ["150%", "-1%", "lots"] {
        let e = Config::parse(&up(&format!(", ratelimit_reserve: '{bad}'")))
            .unwrap_err()
            .0;
        assert!(e.contains("upstreams[0].ratelimit_reserve"), "{bad}: {e}");
    }
    let e = Config::parse(&up(", down_after: 0"))
        .unwrap()
        .validate()
        .unwrap_err()
        .0;
    assert!(e.starts_with("upstreams[0].down_after"), "{e}");
    let e = Config::parse(&up(", backoff_max: 10ms"))
        .unwrap()
        .validate()
        .unwrap_err()
        .0;
    assert!(e.starts_with("upstreams[0].backoff_max"), "{e}");
    // The effective config prints them back, and that parses again.
    let c = Config::parse(&up(", ratelimit_reserve: 25%")).unwrap();
    let again = Config::parse(&c.to_masked_yaml()).unwrap();
    assert_eq!(again.upstreams[0].ratelimit_reserve.0, 25.0);
}

#[test]
fn fill_on_range_is_a_boolean_on_by_default() {
    let c = Config::parse(MINIMAL).unwrap();
    assert!(c.cache.fill_on_range);
    let c = Config::parse(&format!("{MINIMAL}cache: {{ fill_on_range: false }}\n")).unwrap();
    c.validate().unwrap();
    assert!(!c.cache.fill_on_range);
    let e = Config::parse(&format!("{MINIMAL}cache: {{ fill_on_range: sometimes }}\n"))
        .unwrap_err()
        .0;
    assert!(e.starts_with("cache.fill_on_range"), "{e}");
}

#[test]
fn the_cluster_section_is_checked() {
    let base = "listen: 127.0.0.1:5000\nstorage:\n  preference: a\n  engines:\n    a: { url: 'memory://' }\n";
    let parse = |extra: &str| Config::parse(&format!("{base}{extra}"));
    // Unknown keys are errors.
    let e = parse("cluster: { secret_env: X, peers: [a] }\n")
        .unwrap_err()
        .0;
    assert!(e.contains("cluster") && e.contains("peers"), "{e}");
    // The secret must be in the environment.
    let var = "OCIEDGE_TEST_CLUSTER_SECRET_UNSET";
    let e = parse(&format!("cluster: {{ secret_env: {var} }}\n"))
        .unwrap()
        .validate()
        .unwrap_err()
        .0;
    assert!(
        e.starts_with("cluster.secret_env") && e.contains(var),
        "{e}"
    );
    let var = "OCIEDGE_TEST_CLUSTER_SECRET_SET";
    std::env::set_var(var, "s");
    let c = parse(&format!("cluster: {{ secret_env: {var} }}\n")).unwrap();
    c.validate().unwrap();
    // Advertise defaults to the listener, which must then be reachable.
    let cl = c.cluster.as_ref().unwrap();
    assert_eq!(
        cl.advertise_url(c.listen, false).unwrap(),
        "http://127.0.0.1:5000"
    );
    let wild = format!(
        "{}cluster: {{ secret_env: {var} }}\n",
        base.replace("127.0.0.1", "0.0.0.0")
    );
    let e = Config::parse(&wild).unwrap().validate().unwrap_err().0;
    assert!(e.starts_with("cluster.advertise"), "{e}");
    for bad in ["10.0.0.5:5000", "ftp://x", "http://x/path", "http://x?q=1"] {
        let e = parse(&format!(
            "cluster: {{ secret_env: {var}, advertise: '{bad}' }}\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .0;
        assert!(e.starts_with("cluster.advertise"), "{bad}: {e}");
    }
    parse(&format!(
        "cluster: {{ secret_env: {var}, advertise: 'http://10.0.0.5:5000' }}\n"
    ))
    .unwrap()
    .validate()
    .unwrap();
    // Without cluster:, nothing is asked of the environment.
    assert!(parse("").unwrap().cluster.is_none());
}
