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
