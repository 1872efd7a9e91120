//! The status page, `/_ociedge/`: served self-contained and without secrets, and drawn by a real
//! browser (headless Chromium) from a running ociedge with remote engines, a fill in flight and
//! a replication backlog; and from an hour of canned history, on a laptop and on a phone screen.
//! Screenshots and the rendered DOM are kept under `target/test-artifacts/`.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use common::regions::{DelayLine, Moto};
use common::*;
use sha2::Digest as _;

fn artifacts() -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// Headless Chromium on `url`, with a fresh profile; `--virtual-time-budget` lets the page's
/// fetches and timers run before the DOM is dumped or the screenshot taken. Fails, never skips,
/// when Chromium is missing.
async fn chromium(url: &str, mode: &[String]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let child = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(mode)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("chromium (Debian package chromium) is needed: {e}"));
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("chromium finished within 120 s")
        .expect("chromium ran");
    assert!(
        out.status.success(),
        "chromium {mode:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn dump_dom(url: &str) -> String {
    chromium(url, &["--dump-dom".to_string()]).await
}

/// Takes a screenshot into the artifacts directory and checks it is a PNG of that size.
async fn screenshot(url: &str, name: &str, width: u32, height: u32) -> PathBuf {
    let path = artifacts().join(name);
    let _ = std::fs::remove_file(&path);
    chromium(
        url,
        &[
            format!("--screenshot={}", path.display()),
            format!("--window-size={width},{height}"),
        ],
    )
    .await;
    let png = std::fs::read(&path).expect("screenshot written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    assert_eq!((dim(16), dim(20)), (width, height), "IHDR size");
    assert!(png.len() > 20_000, "not a blank page: {} bytes", png.len());
    path
}

/// The `<tr>` whose start tag carries `attr` (e.g. `data-engine="us"`).
fn row<'a>(dom: &'a str, attr: &str) -> &'a str {
    let start = dom
        .find(attr)
        .unwrap_or_else(|| panic!("no row with {attr} in the page:\n{dom}"));
    let len = dom[start..].find("</tr>").expect("row end");
    &dom[start..start + len]
}

/// The text of the element whose start tag ends with `marker` (e.g. `class="num rtt">`).
fn text_after<'a>(html: &'a str, marker: &str) -> &'a str {
    let start = html
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in {html}"))
        + marker.len();
    let len = html[start..].find('<').expect("text end");
    &html[start..start + len]
}

async fn status_json(proxy: &Proxy) -> serde_json::Value {
    client()
        .get(proxy.url("/_ociedge/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON")
}

/// The inline script's hash, as a browser computes it for `script-src 'sha256-…'`.
fn script_hash(page: &str) -> String {
    let start = page.find("<script>").expect("script") + "<script>".len();
    let len = page[start..].find("</script>").expect("script end");
    base64::engine::general_purpose::STANDARD
        .encode(sha2::Sha256::digest(&page[start..start + len]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_is_self_contained_and_shows_no_secrets() {
    let root = tempfile::tempdir().unwrap();
    let dead = free_port();
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nregion: eu-west\nstorage:\n  preference: eu\n  engines:\n    eu: {{ url: \"file://{root}/eu\" }}\n    ap: {{ url: \"s3://registry\", options: {{ endpoint: \"http://127.0.0.1:{dead}\", region: us-east-1, access_key_id: AKIDSTATUSPAGE, secret_access_key: s3cr3t-do-not-show, allow_http: \"true\" }} }}\nupstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{dead}\n    auth: {{ username: bot, password: hunter2-do-not-show }}\n    access: public\npush: {{ engine: eu }}\n",
        root = root.path().display()
    );
    let proxy = Proxy::start(&cfg);
    let c = client();
    let r = c.get(proxy.url("/_ociedge/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    let page = r.text().await.unwrap();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-ociedge-region"], "eu-west");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none';"), "{csp}");
    assert!(
        csp.contains(&format!("script-src 'sha256-{}'", script_hash(&page))),
        "the CSP allows exactly the page's own script: {csp}"
    );
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    // Self-contained: the only URL in it is the SVG namespace (an identifier, never fetched).
    let urls: Vec<&str> = page
        .match_indices("http")
        .map(|(i, _)| &page[i..(i + 40).min(page.len())])
        .filter(|u| !u.starts_with("http://www.w3.org/2000/svg"))
        .collect();
    assert!(urls.is_empty(), "external references: {urls:?}");
    for external in ["src=", "@import", "url(", "<link"] {
        assert!(!page.contains(external), "{external} in the page");
    }
    // Both spellings, and only for reading.
    let r = c.get(proxy.url("/_ociedge")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), page);
    let r = c.post(proxy.url("/_ociedge/")).send().await.unwrap();
    assert_ne!(r.status(), 200);

    // The JSON the page draws: the existing fields, plus the history of the last hour.
    let data = random_bytes(70_000, 9);
    let digest = push_blob(&proxy.url(""), "team/app", data).await;
    for _ in 0..2 {
        let r = c
            .get(proxy.url(&format!("/v2/team/app/blobs/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 70_000);
    }
    let s = status_json(&proxy).await;
    for field in [
        "region",
        "local_engine",
        "engines",
        "fills_in_flight",
        "replication_backlog",
        "history",
    ] {
        assert!(s.get(field).is_some(), "{field} in {s}");
    }
    assert_eq!(s["region"], "eu-west");
    let hist = &s["history"];
    assert_eq!(hist["interval_seconds"], 10);
    assert_eq!(hist["window_seconds"], 3600);
    assert!(hist["now"].as_f64().unwrap() > 1.6e9);
    // The live sample already counts what was just served.
    let samples = hist["samples"].as_array().unwrap();
    let served_local: u64 = samples
        .iter()
        .filter_map(|x| x["served"]["local"].as_u64())
        .sum();
    let hits: u64 = samples.iter().filter_map(|x| x["hits"].as_u64()).sum();
    assert_eq!(served_local, 140_000, "{hist}");
    assert_eq!(hits, 2, "{hist}");
    // No secret, in the JSON or the page.
    let json = s.to_string();
    for secret in [
        "s3cr3t-do-not-show",
        "AKIDSTATUSPAGE",
        "hunter2-do-not-show",
    ] {
        assert!(!json.contains(secret), "{secret} in the status JSON");
        assert!(!page.contains(secret), "{secret} in the page");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs chromium, moto, docker-registry, python3"]
async fn chromium_renders_engines_fills_and_the_backlog_of_a_running_ociedge() {
    let root = tempfile::tempdir().unwrap();
    // ap: an S3 region behind a delay line that goes down after the first probes (its RTT is
    // known, and pushed content cannot be replicated to it).
    let s3 = Moto::start(None, "127.0.0.1");
    let ap_port = free_port();
    let ap_line = DelayLine::start(ap_port, s3.port, 2);
    // docker.io: a registry behind a slow link, so a fill from it stays in flight.
    let origin = Origin::start();
    let big = random_bytes(8 << 20, 42);
    let big_digest = push_blob(&origin.url(), "library/big", big).await;
    let slow_port = free_port();
    let _slow = DelayLine::start_limited(slow_port, origin.port, 1, Some(256 * 1024));
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nregion: eu-west\nstorage:\n  preference: eu\n  probe: {{ interval: 300ms }}\n  engines:\n    eu: {{ url: \"file://{root}/eu\" }}\n    us: {{ url: \"file://{root}/us\" }}\n    ap: {{ url: \"s3://registry\", options: {{ endpoint: \"http://127.0.0.1:{ap_port}\", region: us-east-1, access_key_id: k, secret_access_key: s3cr3t-do-not-show, allow_http: \"true\" }}, replicate_by_default: true }}\nupstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{slow_port}\npush: {{ engine: eu }}\n",
        root = root.path().display()
    );
    std::fs::create_dir_all(root.path().join("us")).unwrap();
    let proxy = Proxy::start(&cfg);
    let measured = eventually(Duration::from_secs(20), async || {
        let s = status_json(&proxy).await;
        s["engines"]
            .as_array()
            .is_some_and(|e| e.len() == 3 && e.iter().all(|e| e["rtt_ms"].is_number()))
    })
    .await;
    assert!(
        measured,
        "every engine probed: {}",
        status_json(&proxy).await
    );
    drop(ap_line); // ap goes down

    // A push (POST with the body and ?digest=), queued for ap, which is down.
    let pushed = random_bytes(300_000, 7);
    let pushed_digest = format!("sha256:{}", sha256_hex(&pushed));
    let c = client();
    let r = c
        .post(proxy.url(&format!(
            "/v2/team/app/blobs/uploads/?digest={pushed_digest}"
        )))
        .header("content-type", "application/octet-stream")
        .body(pushed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "monolithic push");
    for _ in 0..2 {
        let r = c
            .get(proxy.url(&format!("/v2/team/app/blobs/{pushed_digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    }
    // A slow miss: the fill runs while the page is drawn.
    let url = proxy.url(&format!("/v2/library/big/blobs/{big_digest}"));
    let pull = tokio::spawn(async move {
        let r = client().get(url).send().await.ok()?;
        r.bytes().await.ok().map(|b| b.len())
    });
    let ready = eventually(Duration::from_secs(30), async || {
        let s = status_json(&proxy).await;
        s["replication_backlog"]["ap"]["jobs"].as_u64() >= Some(1)
            && s["fills_in_flight"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["written"].as_u64() > Some(0)))
    })
    .await;
    assert!(
        ready,
        "a backlog and a fill in flight: {}",
        status_json(&proxy).await
    );

    let page = proxy.url("/_ociedge/");
    // The ranking follows measured round trips: two engines a few microseconds apart may swap
    // between the page's fetch and ours. Ask again until both saw the same ranking.
    let ranked = |dom: &str, s: &serde_json::Value| {
        let mut at = dom.find("data-engine=\"eu\"");
        s["engines"].as_array().is_some_and(|es| {
            es.iter().all(|e| {
                let pos = e["id"]
                    .as_str()
                    .and_then(|id| dom.find(&format!("data-engine=\"{id}\"")));
                let ok = pos.is_some() && pos > at;
                at = pos;
                ok
            })
        })
    };
    let mut dom = dump_dom(&page).await;
    let mut s = status_json(&proxy).await;
    for _ in 0..4 {
        if ranked(&dom, &s) {
            break;
        }
        dom = dump_dom(&page).await;
        s = status_json(&proxy).await;
    }
    std::fs::write(artifacts().join("status-page.html"), &dom).unwrap();
    let shot = screenshot(&page, "status-page.png", 1280, 900).await;
    eprintln!("screenshot: {}", shot.display());

    assert!(
        dom.contains("id=\"conn\" class=\"muted\">updated"),
        "the page fetched the status:\n{dom}"
    );
    assert_eq!(text_after(&dom, "id=\"region\">"), "eu-west");
    assert_eq!(text_after(&dom, "id=\"local-id\" class=\"mono\">"), "eu");
    assert_eq!(text_after(&dom, "id=\"local-up\" class=\"pill up\">"), "up");
    for id in ["eu", "us", "ap", "docker.io"] {
        let r = row(&dom, &format!("data-engine=\"{id}\""));
        let rtt = text_after(r, "class=\"num rtt\">");
        let ms: f64 = rtt
            .strip_suffix(" ms")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("engine {id}: RTT {rtt:?}"));
        assert!(ms > 0.0 && ms < 5000.0, "engine {id}: {rtt}");
    }
    // Nearest first: the rows follow the JSON's ranking, after the local engine.
    let mut at = dom.find("data-engine=\"eu\"").unwrap();
    for e in s["engines"].as_array().unwrap() {
        let id = e["id"].as_str().unwrap();
        let pos = dom.find(&format!("data-engine=\"{id}\"")).unwrap();
        assert!(pos > at, "{id} out of order");
        at = pos;
    }
    let jobs = s["replication_backlog"]["ap"]["jobs"].as_u64().unwrap();
    let backlog = row(&dom, "data-target=\"ap\"");
    assert_eq!(text_after(backlog, "class=\"num jobs\">"), jobs.to_string());
    assert!(
        text_after(backlog, "class=\"num age\">").ends_with(" s"),
        "oldest job age: {backlog}"
    );
    assert_eq!(text_after(&dom, "id=\"t-backlog\">"), jobs.to_string());
    assert!(
        dom.contains("id=\"t-usage-tile\" hidden=\"\""),
        "no cache.max_size, no usage tile"
    );
    let fill = row(&dom, &format!("data-digest=\"{big_digest}\""));
    assert!(fill.contains("role=\"progressbar\""), "{fill}");
    assert!(fill.contains("of 8.0 MiB"), "{fill}");
    assert!(
        row(&dom, "data-engine=\"eu\"").contains("KiB"),
        "bytes served from local in the last minutes"
    );
    assert!(dom.contains("data-source=\"local\""), "chart legend");
    assert!(dom.contains("<polygon"), "bytes chart drawn");
    assert!(!dom.contains("s3cr3t-do-not-show"));
    pull.abort();
}

/// A minimal HTTP server for the canned test: `/` is the page, `/status` the JSON.
async fn serve_canned(page: String, status: String) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (page, status) = (page.clone(), status.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split(' ').nth(1).unwrap_or("/");
                let (ctype, body) = if path.starts_with("/status") {
                    ("application/json", status)
                } else {
                    ("text/html; charset=utf-8", page)
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    port
}

/// An hour of history, as a long-running instance would report it: every number on the page
/// can be worked out by hand.
fn canned_status() -> serde_json::Value {
    let now = 1_800_000_000.0;
    let mib = 1u64 << 20;
    let samples: Vec<_> = (0..360)
        .map(|i| {
            let t = now - 3600.0 + 10.0 * f64::from(i + 1);
            let mut served = serde_json::json!({ "local": 10 * mib });
            if i >= 330 {
                served["us"] = serde_json::json!(5 * mib);
            }
            serde_json::json!({ "t": t, "secs": 10.0, "hits": 3, "misses": 1, "served": served, "fetched": { "us": 5 * mib } })
        })
        .collect();
    serde_json::json!({
        "region": "eu-west",
        "local_engine": { "id": "eu", "up": true, "rtt_ms": 0.42 },
        "engines": [
            { "id": "us", "kind": "storage", "rank": 1, "rtt_ms": 81.3, "up": true, "consecutive_failures": 0, "priority": 0, "last_error": null },
            { "id": "ap", "kind": "storage", "rank": 2, "rtt_ms": 190.0, "up": false, "consecutive_failures": 4, "priority": 0,
              "last_error": "<img src=x onerror=alert(1)> refused" },
            { "id": "docker.io", "kind": "registry", "rank": 3, "rtt_ms": null, "up": false, "consecutive_failures": 5, "priority": 0,
              "last_error": "upstream docker.io is down (circuit breaker open after 5 consecutive failures)" }
        ],
        "upstream_quota": { "docker.io": { "limit": 100, "remaining": 5, "credential": "bot",
            "credentials": { "bot": { "limit": 100, "remaining": 5 } } } },
        "upstreams": [
            { "name": "docker.io", "breaker": "open", "consecutive_failures": 5, "openings": 2, "down_after": 5,
              "retry_in_s": 42, "backoff": null, "last_error": "answered 502 Bad Gateway",
              "quota": { "bot": { "limit": 100, "remaining": 5 } }, "credential": "bot", "quota_low": true }
        ],
        "fills_in_flight": [
            { "digest": format!("sha256:{}", "ab".repeat(32)), "size": 8 * mib, "written": 3 * mib, "source": "us" }
        ],
        "replication_backlog": { "ap": { "jobs": 12, "oldest_age_seconds": 754.2, "failing": 3, "last_error": "connection refused" } },
        "local_engine_usage": { "bytes": 120u64 << 30, "entries": 5000, "max_size": 500u64 << 30 },
        "prewarm": [
            { "id": "0123456789abcdef0123456789abcdef", "state": "running", "finished": false, "images": 2, "images_done": 1,
              "engines": {
                  "eu": { "blobs_total": 4, "blobs_done": 3, "bytes_done": 4 * mib, "bytes_transferred": 3 * mib, "manifests_done": 2, "errors": [] },
                  "us": { "blobs_total": 4, "blobs_done": 1, "bytes_done": mib, "bytes_transferred": mib, "manifests_done": 0, "errors": ["<b>slow</b> timed out"] }
              } }
        ],
        "history": { "now": now, "interval_seconds": 10, "window_seconds": 3600, "samples": samples }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs chromium"]
async fn chromium_draws_an_hour_of_history_on_a_laptop_and_a_phone() {
    // The page as the binary serves it, fed canned JSON.
    let proxy = Proxy::start(&mirror_config("http://127.0.0.1:9", ""));
    let page = get_text(proxy.url("/_ociedge/")).await;
    let port = serve_canned(page, canned_status().to_string()).await;
    let url = format!("http://127.0.0.1:{port}/");
    let dom = dump_dom(&url).await;
    std::fs::write(artifacts().join("status-page-history.html"), &dom).unwrap();
    screenshot(&url, "status-page-history.png", 1280, 1300).await;
    // Headless Chromium lays out no narrower than 500 CSS px; that is inside the page's phone
    // breakpoint (700 px), where every table turns into labelled cards.
    screenshot(&url, "status-page-phone.png", 500, 1900).await;

    assert_eq!(text_after(&dom, "id=\"t-hit\">"), "75.0%");
    // 360 samples of 10 MiB from local, and 30 of 5 MiB from us.
    assert_eq!(text_after(&dom, "id=\"t-served\">"), "3.7 GiB");
    assert_eq!(text_after(&dom, "id=\"t-rate\">"), "1.5 MiB/s");
    assert_eq!(text_after(&dom, "id=\"t-fills\">"), "1");
    assert_eq!(text_after(&dom, "id=\"t-backlog\">"), "12");
    assert_eq!(text_after(&dom, "id=\"t-usage\">"), "120 GiB");
    assert_eq!(
        text_after(&dom, "id=\"t-usage-k\">"),
        "Local engine used, of 500 GiB"
    );
    assert!(
        dom.contains("id=\"t-usage-tile\">"),
        "usage shown (not hidden)"
    );
    let us = row(&dom, "data-engine=\"us\"");
    assert!(us.contains(">150 MiB<"), "served from us in 5 min: {us}");
    assert!(us.contains(">81.3 ms<"), "{us}");
    assert!(row(&dom, "data-engine=\"eu\"").contains(">300 MiB<"));
    let ap = row(&dom, "data-engine=\"ap\"");
    assert!(ap.contains("class=\"pill down\""), "{ap}");
    // An error message is text, never markup.
    assert!(
        ap.contains("&lt;img src=x onerror=alert(1)&gt; refused"),
        "{ap}"
    );
    // (Newer Chromium also escapes `<` inside attribute values, older does not: the tooltip's
    // `title="<img …"` is not an element.)
    let elements = dom
        .match_indices("<img")
        .filter(|(i, _)| !dom[..*i].ends_with("title=\""))
        .count();
    assert_eq!(elements, 0, "markup from the JSON was not rendered");
    // An upstream: its breaker state and its quota, in words.
    let hub = row(&dom, "data-engine=\"docker.io\"");
    assert!(
        hub.contains(">breaker open, retry in 42 s<"),
        "breaker state shown: {hub}"
    );
    assert!(
        hub.contains(">pull quota 5 of 100 as bot, under the reserve: tags served stale<"),
        "quota shown: {hub}"
    );
    let fill = row(&dom, "data-digest=\"sha256:abab");
    assert!(fill.contains("aria-valuenow=\"38\""), "{fill}");
    assert!(fill.contains("3.0 MiB of 8.0 MiB (37.5%)"), "{fill}");
    // A prewarm job: its progress per engine, its errors as text.
    let job = row(&dom, "data-job=\"0123456789abcdef");
    assert!(job.contains(">running<") && job.contains(">1/2<"), "{job}");
    assert!(
        job.contains(">eu 3/4<") && job.contains("aria-valuenow=\"75\""),
        "{job}"
    );
    assert!(
        job.contains(">4.0 MiB<"),
        "transferred, every engine: {job}"
    );
    assert!(
        job.contains("us: &lt;b&gt;slow&lt;/b&gt; timed out"),
        "{job}"
    );
    let backlog = row(&dom, "data-target=\"ap\"");
    assert_eq!(text_after(backlog, "class=\"num age\">"), "12 min 34 s");
    assert_eq!(dom.matches("<polygon").count(), 2, "one band per source");
    assert!(dom.contains("data-source=\"us\""));
    assert!(
        dom.matches("<circle").count() == 0 && dom.contains("<polyline"),
        "an hour of hit ratio is a line"
    );
}
