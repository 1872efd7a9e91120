//! The Grafana dashboard (`deploy/grafana/ociedge.json`) and the alert rules
//! (`deploy/prometheus/ociedge-rules.yaml`) only name metrics that `/metrics` really exports: a
//! renamed metric turns a panel blank or an alert silent without any error, so the names are
//! checked against a running ociedge that was made to export every family.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Names PromQL gives to metrics, not functions, keywords, labels or Grafana variables.
fn metric_names(expr: &str) -> Vec<String> {
    // Label matchers, ranges and string literals first: `{route="blob"}`, `[$__rate_interval]`.
    let mut bare = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
                bare.push(' ');
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                let mut quote = None;
                while let Some(d) = chars.next() {
                    match quote {
                        Some(_) if d == '\\' => {
                            chars.next();
                        }
                        Some(q) if d == q => quote = None,
                        Some(_) => {}
                        None if d == '"' || d == '\'' => quote = Some(d),
                        None if d == close => break,
                        None => {}
                    }
                }
                bare.push(' ');
            }
            _ => bare.push(c),
        }
    }
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let b = bare.as_bytes();
    let mut names = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_digit() || c == b'.' {
            // Numbers, including 1e3 and durations after `offset`.
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c == b':' || c == b'$' {
            let start = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &bare[start..i];
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let call = j < b.len() && b[j] == b'(';
            let lower = word.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) {
                if call {
                    // Skip the label list.
                    while j < b.len() && b[j] != b')' {
                        j += 1;
                    }
                    i = j + 1;
                }
                continue;
            }
            // `sum by (le) (…)`: an aggregation whose grouping comes before its argument.
            let rest = bare[j..].trim_start();
            let grouped = AGGREGATIONS.contains(&lower.as_str())
                && (rest.starts_with("by") || rest.starts_with("without"));
            if call || grouped || word.starts_with('$') || KEYWORDS.contains(&lower.as_str()) {
                continue;
            }
            names.push(word.to_string());
            continue;
        }
        i += 1;
    }
    names
}

#[test]
fn the_promql_scanner_finds_metric_names_only() {
    let e = r#"histogram_quantile(0.99, sum by (le, route) (rate(ociedge_http_request_duration_seconds_bucket{instance=~"$instance", route!="a{b}"}[$__rate_interval])))"#;
    assert_eq!(
        metric_names(e),
        ["ociedge_http_request_duration_seconds_bucket"]
    );
    let e = "(sum by (instance) (ociedge_engine_up) - sum(x:recorded) by (instance)) < 1 and on (instance) count by (instance) (ociedge_engine_up offset 5m) > 1e3";
    assert_eq!(
        metric_names(e),
        ["ociedge_engine_up", "x:recorded", "ociedge_engine_up"]
    );
    assert_eq!(
        metric_names(r#"up{job="ociedge"} == 0 unless bool foo"#),
        ["up", "foo"]
    );
}

/// Every `expr` in the dashboard, and the metric of every `label_values(metric, label)` variable.
fn dashboard_queries() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(deploy("grafana/ociedge.json")).expect("dashboard");
    let v: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    fn walk(v: &serde_json::Value, exprs: &mut Vec<String>, vars: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr", serde_json::Value::String(s)) => exprs.push(s.clone()),
                        ("query" | "definition", serde_json::Value::String(s))
                            if s.starts_with("label_values(") =>
                        {
                            let inner = &s["label_values(".len()..];
                            let metric = inner.split([',', ')', '{']).next().unwrap_or("");
                            vars.push(metric.trim().to_string());
                        }
                        _ => walk(x, exprs, vars),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, exprs, vars)),
            _ => {}
        }
    }
    let (mut exprs, mut vars) = (Vec::new(), Vec::new());
    walk(&v, &mut exprs, &mut vars);
    (exprs, vars)
}

/// Every `expr` of the alert rules, as `(alert, expr)`.
fn rule_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("prometheus/ociedge-rules.yaml")).expect("rules");
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("rules are YAML");
    let groups = v["groups"].as_sequence().expect("groups");
    let mut out = Vec::new();
    for g in groups {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().expect("every rule is an alert");
            let expr = r["expr"].as_str().expect("expr");
            assert!(
                r["labels"]["severity"].as_str().is_some(),
                "{name}: severity label"
            );
            assert!(
                r["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            out.push((name.to_string(), expr.to_string()));
        }
    }
    out
}

/// Names of the samples in a Prometheus text exposition (`_total`, `_bucket`… included).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// A blob written straight into a `file://` engine's Distribution layout.
fn plant_blob(root: &Path, digest: &str, data: &[u8]) {
    let hex = digest.trim_start_matches("sha256:");
    let dir = root.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}",
        &hex[..2]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("data"), data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let root = tempfile::tempdir().unwrap();
    let dead = free_port(); // nothing listens here: a region that is down
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nregion: eu\nstorage:\n  preference: eu\n  probe: {{ interval: 300ms }}\n  engines:\n    eu: {{ url: \"file://{root}/eu\" }}\n    us: {{ url: \"file://{root}/us\", replicate_by_default: true }}\n    ap: {{ url: \"s3://registry\", options: {{ endpoint: \"http://127.0.0.1:{dead}\", region: us-east-1, access_key_id: k, secret_access_key: s, allow_http: \"true\" }}, replicate_by_default: true }}\nupstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{dead}\npush: {{ engine: eu }}\n",
        root = root.path().display()
    );
    std::fs::create_dir_all(root.path().join("us")).unwrap();
    let proxy = Proxy::start(&cfg);
    let c = client();
    let get = |path: String| {
        let c = c.clone();
        let url = proxy.url(&path);
        async move {
            match c.get(url).send().await {
                // Bodies are read so that streamed responses count their bytes.
                Ok(r) => (r.status().as_u16(), r.bytes().await.map(|b| b.len()).ok()),
                Err(_) => (0, None),
            }
        }
    };
    // A push (replicated to us, failing to ap), then hits on it.
    let pushed = push_blob(&proxy.url(""), "team/app", random_bytes(100_000, 1)).await;
    assert_eq!(get(format!("/v2/team/app/blobs/{pushed}")).await.0, 200);
    assert_eq!(get(format!("/v2/team/app/blobs/{pushed}")).await.0, 200);
    // A miss filled from us (in a mirrored repository: in the pushed `team/app`, only what the
    // preferred engine links is served).
    let remote = random_bytes(50_000, 2);
    let remote_digest = format!("sha256:{}", sha256_hex(&remote));
    plant_blob(&root.path().join("us"), &remote_digest, &remote);
    assert_eq!(
        get(format!("/v2/library/app/blobs/{remote_digest}")).await,
        (200, Some(50_000))
    );
    // A blob whose bytes in us do not match its digest.
    let wrong = format!("sha256:{}", sha256_hex(b"what it should be"));
    plant_blob(&root.path().join("us"), &wrong, b"something else entirely");
    let _ = get(format!("/v2/library/app/blobs/{wrong}")).await;
    // A tag the upstream cannot be asked for.
    let _ = get("/v2/library/nothing/manifests/latest".into()).await;
    let _ = get("/_ociedge/status".into()).await;

    let metrics = || async { get_text(proxy.url("/metrics")).await };
    let settled = eventually(Duration::from_secs(30), async || {
        let m = metrics().await;
        m.contains("ociedge_replication_jobs_done_total{engine=\"us\"}")
            && m.contains("ociedge_replication_failures_total{engine=\"ap\"}")
            && m.contains("ociedge_digest_mismatches_total{engine=\"us\"}")
            && m.contains("ociedge_fills_total{result=\"done\"}")
    })
    .await;
    let text = metrics().await;
    assert!(settled, "every family has samples:\n{text}");
    let names = exported(&text);

    let (exprs, vars) = dashboard_queries();
    assert!(exprs.len() >= 20, "{} panel queries", exprs.len());
    let rules = rule_exprs();
    assert!(rules.len() >= 4);
    // `up` is Prometheus's own per-target metric (OciedgeDown), not ours.
    let external: &[&str] = &["up"];
    let mut missing = Vec::new();
    let mut named = BTreeSet::new();
    let sources = exprs
        .iter()
        .map(|e| ("dashboard".to_string(), e.clone()))
        .chain(
            vars.iter()
                .map(|v| ("dashboard variable".to_string(), v.clone())),
        )
        .chain(rules.iter().map(|(a, e)| (format!("alert {a}"), e.clone())));
    for (whence, expr) in sources {
        let found = metric_names(&expr);
        assert!(!found.is_empty(), "{whence}: no metric in {expr:?}");
        for n in found {
            if !names.contains(&n) && !external.contains(&n.as_str()) {
                missing.push(format!("{whence}: {n} (in {expr})"));
            }
            named.insert(n);
        }
    }
    assert!(
        missing.is_empty(),
        "names /metrics does not export:\n{}\n--- /metrics ---\n{text}",
        missing.join("\n")
    );
    // The dashboard covers what the issue asks for.
    for family in [
        "ociedge_http_requests_total",
        "ociedge_http_request_duration_seconds_bucket",
        "ociedge_bytes_served_total",
        "ociedge_cache_requests_total",
        "ociedge_fills_in_flight",
        "ociedge_fills_total",
        "ociedge_upstream_errors_total",
        "ociedge_engine_rtt_seconds",
        "ociedge_engine_up",
        "ociedge_local_engine_up",
        "ociedge_replication_jobs_queued",
        "ociedge_replication_oldest_job_age_seconds",
        "ociedge_replication_failures_total",
        "ociedge_local_engine_bytes",
        "ociedge_evicted_bytes_total",
    ] {
        assert!(named.contains(family), "nothing shows {family}");
    }
    // The local engine's own gauge, for the alert that /readyz cannot be.
    assert!(
        text.contains("ociedge_local_engine_up{engine=\"eu\"} 1"),
        "{text}"
    );
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("promtool (Debian package prometheus) is needed: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// promtool parses the rules and runs their unit tests (when each alert fires and when it must
/// not), and parses every dashboard query as PromQL (with Grafana's variables substituted).
#[test]
#[ignore = "needs promtool"]
fn promtool_checks_the_rules_and_the_dashboard_queries() {
    let rules = deploy("prometheus/ociedge-rules.yaml");
    let out = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(out.contains("SUCCESS"), "{out}");
    let tests = deploy("prometheus/ociedge-rules.test.yaml");
    let out = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(out.contains("SUCCESS"), "{out}");

    let (exprs, _) = dashboard_queries();
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        let quoted = serde_json::to_string(&e).unwrap(); // a JSON string is a YAML string
        yaml.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {quoted}\n"
        ));
    }
    let path = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = promtool(&["check", "rules", path.to_str().unwrap()]);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}

/// Every metric name the dashboard, its variables and the alert rules use.
fn names_used() -> BTreeSet<String> {
    let (exprs, vars) = dashboard_queries();
    exprs
        .iter()
        .chain(vars.iter())
        .cloned()
        .chain(rule_exprs().into_iter().map(|(_, e)| e))
        .flat_map(|e| metric_names(&e))
        .filter(|n| n != "up")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_process_exports_every_family_from_the_first_scrape() {
    let root = tempfile::tempdir().unwrap();
    let dead = free_port();
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nregion: eu\nstorage:\n  preference: eu\n  engines:\n    eu: {{ url: \"file://{root}/eu\" }}\n    us: {{ url: \"file://{root}/us\", replicate_by_default: true }}\n    ap: {{ url: \"s3://registry\", options: {{ endpoint: \"http://127.0.0.1:{dead}\", region: us-east-1, access_key_id: k, secret_access_key: s, allow_http: \"true\" }} }}\nupstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{dead}\npush: {{ engine: eu }}\ncache: {{ max_size: 1GiB }}\n",
        root = root.path().display()
    );
    std::fs::create_dir_all(root.path().join("us")).unwrap();
    let proxy = Proxy::start(&cfg);
    // No traffic at all: the first scrape.
    let text = get_text(proxy.url("/metrics")).await;
    let names = exported(&text);
    let missing: Vec<String> = names_used().difference(&names).cloned().collect();
    assert!(
        missing.is_empty(),
        "absent from a fresh process: {missing:?}\n--- /metrics ---\n{text}"
    );
    // The series whose labels the config names are there, at 0.
    for engine in ["us", "ap", "docker.io"] {
        for family in [
            "ociedge_upstream_errors_total",
            "ociedge_engine_bytes_received_total",
            "ociedge_engine_requests_total",
            "ociedge_digest_mismatches_total",
            "ociedge_bytes_served_total",
        ] {
            let label = if family == "ociedge_bytes_served_total" {
                "source"
            } else {
                "engine"
            };
            let series = format!("{family}{{{label}=\"{engine}\"}}");
            assert_eq!(metric_in(&text, &series), Some(0.0), "{series}\n{text}");
        }
    }
    for family in [
        "ociedge_replication_jobs_queued",
        "ociedge_replication_failures_total",
        "ociedge_replication_jobs_done_total",
        "ociedge_replication_dead_letters_total",
        "ociedge_prewarm_blobs_total",
        "ociedge_prewarm_bytes_total",
    ] {
        let series = format!("{family}{{engine=\"us\"}}");
        assert_eq!(metric_in(&text, &series), Some(0.0), "{series}\n{text}");
    }
    assert_eq!(
        metric_in(&text, "ociedge_bytes_served_total{source=\"local\"}"),
        Some(0.0)
    );
}
