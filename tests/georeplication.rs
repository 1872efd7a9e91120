//! Georeplicated engines: misses served from the nearest remote engine that has the content,
//! ranked by measured round-trip time, with failover; against moto S3 servers written by
//! docker-registry's S3 driver, reached through real network latency.

mod common;

use std::time::Duration;

use common::regions::{DelayLine, Moto, Regions};
use common::*;
use futures::StreamExt;

async fn status(proxy: &Proxy) -> serde_json::Value {
    client()
        .get(proxy.url("/_ociedge/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Ids of the remote engines, nearest first.
async fn ranking(proxy: &Proxy) -> Vec<String> {
    let s = status(proxy).await;
    s["engines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

async fn source(proxy: &Proxy, path: &str) -> String {
    let r = client().get(proxy.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let s = r.headers()["x-ociedge-source"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = r.bytes().await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root, iptables, docker-registry, skopeo, moto (the README test command runs it)"]
async fn misses_come_from_the_nearest_region_with_failover() {
    // near: 10 ms and 200 Mbit/s (so a 48 MiB transfer takes long enough to be cut), far: 80 ms.
    let regions = Regions::up(&["near:10:200mbit", "far:80"]);
    let mut near_s3 = Moto::start(Some("near"), &regions.ip("near"));
    let far_s3 = Moto::start(Some("far"), &regions.ip("far"));
    let near_reg = Origin::start_s3(&near_s3.endpoint());
    let far_reg = Origin::start_s3(&far_s3.endpoint());
    near_reg.push(&[("small-1.0", "library/small:1.0", false)]);
    far_reg.push(&[
        ("small-1.0", "library/small:1.0", false),
        ("app-v1", "org/team/app:v1", false),
    ]);
    let big = random_bytes(48 << 20, 48);
    let big_digest = push_blob(&near_reg.url(), "big/blob", big.clone()).await;
    push_blob(&far_reg.url(), "big/blob", big).await;

    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nregion: eu\nstorage:\n  preference: local\n  probe: {{ interval: 200ms, timeout: 1s, down_after: 2 }}\n  engines:\n    local: {{ url: \"file://{{DIR}}/data\" }}\n    near: {}\n    far: {}\n",
        near_s3.engine_yaml(None),
        far_s3.engine_yaml(None)
    );
    let proxy = Proxy::start(&cfg);
    assert!(
        eventually(Duration::from_secs(10), async || ranking(&proxy).await
            == ["near", "far"])
        .await,
        "{}",
        status(&proxy).await
    );
    let s = status(&proxy).await;
    let near_rtt = s["engines"][0]["rtt_ms"].as_f64().unwrap();
    let far_rtt = s["engines"][1]["rtt_ms"].as_f64().unwrap();
    assert!(
        near_rtt >= 8.0 && far_rtt >= 70.0 && far_rtt > near_rtt,
        "measured RTTs {near_rtt} {far_rtt}"
    );

    // A miss is served by the near region, fills the local engine, and the next pull is local.
    let manifest = format!("/v2/library/small/manifests/{SMALL}");
    assert_eq!(source(&proxy, &manifest).await, "near");
    assert_eq!(source(&proxy, &manifest).await, "local");
    let m: serde_json::Value = client()
        .get(proxy.url(&manifest))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let blob = format!("/v2/library/small/blobs/{layer}");
    assert_eq!(source(&proxy, &blob).await, "near");
    assert!(
        eventually(Duration::from_secs(10), async || proxy
            .blob_path(&layer)
            .exists())
        .await
    );
    assert_eq!(source(&proxy, &blob).await, "local");
    assert!(verify_pull(&proxy.host(), "library/small:1.0", SMALL));

    // Content only in the far region: one "not found" from near, then far.
    assert_eq!(
        source(&proxy, &format!("/v2/org/team/app/manifests/{APP}")).await,
        "far"
    );
    assert!(verify_pull(&proxy.host(), "org/team/app:v1", APP));

    // The near region's S3 server dies mid-transfer: the client's stream continues from far, and
    // the fill is whole.
    let r = client()
        .get(proxy.url(&format!("/v2/big/blob/blobs/{big_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-ociedge-source"], "near");
    let mut stream = r.bytes_stream();
    let mut got: Vec<u8> = Vec::new();
    while got.len() < (4 << 20) {
        got.extend_from_slice(&stream.next().await.unwrap().unwrap());
    }
    near_s3.kill();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.expect("the stream continues unbroken"));
    }
    assert_eq!(format!("sha256:{}", sha256_hex(&got)), big_digest);
    assert!(
        eventually(Duration::from_secs(20), async || proxy
            .blob_path(&big_digest)
            .exists())
        .await
    );
    let stored = std::fs::read(proxy.blob_path(&big_digest)).unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&stored)), big_digest);
    assert!(
        proxy.log().contains("fill resumed"),
        "the fill resumed on another engine"
    );
    // The dead engine drops to the back of the ranking.
    assert!(
        eventually(Duration::from_secs(10), async || ranking(&proxy).await
            == ["far", "near"])
        .await
    );
    let metrics = get_text(proxy.url("/metrics")).await;
    assert!(
        metrics.contains("ociedge_engine_up{engine=\"near\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("ociedge_engine_rtt_seconds{engine=\"far\"}"));
    drop(proxy);

    // A region whose local engine (an S3 bucket) is unreachable: not ready, still serving.
    let mut local_s3 = Moto::start(None, "127.0.0.1");
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nregion: eu\nstorage:\n  preference: local\n  probe: {{ interval: 200ms, timeout: 1s, down_after: 2 }}\n  engines:\n    local: {}\n    far: {}\n",
        local_s3.engine_yaml(None),
        far_s3.engine_yaml(None)
    );
    let proxy = Proxy::start(&cfg);
    assert_eq!(
        client()
            .get(proxy.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    local_s3.kill();
    assert!(
        eventually(Duration::from_secs(10), async || client()
            .get(proxy.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 503)
        .await,
        "readyz turns 503"
    );
    assert!(
        verify_pull(&proxy.host(), "library/small:1.0", SMALL),
        "pulls still succeed"
    );
    // Blobs come from the remote engine every time: nothing can be filled.
    assert_eq!(source(&proxy, &blob).await, "far");
    assert_eq!(source(&proxy, &blob).await, "far");
    drop(proxy);
    drop(regions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, moto (the README test command runs it)"]
async fn the_ranking_follows_the_network_when_delays_swap() {
    let a_s3 = Moto::start(None, "127.0.0.1");
    let b_s3 = Moto::start(None, "127.0.0.1");
    let a_reg = Origin::start_s3(&a_s3.endpoint());
    let b_reg = Origin::start_s3(&b_s3.endpoint());
    let (a_port, b_port) = (free_port(), free_port());
    let mut a_line = DelayLine::start(a_port, a_s3.port, 3);
    let mut b_line = DelayLine::start(b_port, b_s3.port, 40);
    // Engine a is named by host name: resolved by hickory, as a GeoDNS name would be.
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: local\n  probe: {{ interval: 200ms, timeout: 2s }}\n  engines:\n    local: {{ url: \"file://{{DIR}}/data\" }}\n    a: {}\n    b: {}\n",
        a_s3.engine_yaml(Some(&format!("http://localhost:{a_port}"))),
        b_s3.engine_yaml(Some(&format!("http://127.0.0.1:{b_port}")))
    );
    let proxy = Proxy::start(&cfg);
    assert!(
        eventually(Duration::from_secs(10), async || ranking(&proxy).await
            == ["a", "b"])
        .await,
        "{}",
        status(&proxy).await
    );
    let first = random_bytes(1 << 20, 1);
    let d1 = push_blob(&a_reg.url(), "swap/x", first.clone()).await;
    push_blob(&b_reg.url(), "swap/x", first).await;
    assert_eq!(source(&proxy, &format!("/v2/swap/x/blobs/{d1}")).await, "a");

    // Swap the delays: a is now far and b near.
    drop(a_line);
    drop(b_line);
    a_line = DelayLine::start(a_port, a_s3.port, 40);
    b_line = DelayLine::start(b_port, b_s3.port, 3);
    let start = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(10), async || ranking(&proxy).await
            == ["b", "a"])
        .await,
        "{}",
        status(&proxy).await
    );
    // Within a few probe intervals (200 ms each), allowing for the delayed probes themselves.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    let second = random_bytes(1 << 20, 2);
    let d2 = push_blob(&a_reg.url(), "swap/x", second.clone()).await;
    push_blob(&b_reg.url(), "swap/x", second).await;
    assert_eq!(source(&proxy, &format!("/v2/swap/x/blobs/{d2}")).await, "b");
    drop((a_line, b_line));
}
