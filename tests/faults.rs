//! Faults between ociedge and a real Distribution registry, and a real S3 server: status errors,
//! resets, corrupted bytes, latency and stalls. Under every fault ociedge serves the right bytes
//! or a failed/broken response, never wrong bytes as a clean one, stores nothing wrong, and keeps
//! serving.

mod common;

use std::time::Duration;

use common::faults::{Fault, FaultProxy};
use common::*;

/// What a client got: the status, and the body's digest if it arrived whole.
async fn fetch(proxy: &Proxy, path: &str) -> (u16, Option<String>) {
    let r = client().get(proxy.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    match r.bytes().await {
        Ok(b) => (status, Some(format!("sha256:{}", sha256_hex(&b)))),
        Err(_) => (status, None),
    }
}

async fn healthy(proxy: &Proxy) -> bool {
    client()
        .get(proxy.url("/healthz"))
        .send()
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn registry_faults_never_yield_wrong_bytes() {
    let origin = Origin::start();
    let faults = FaultProxy::start(&origin.url()).await;
    let proxy = Proxy::start(&mirror_config(&faults.url(), ""));
    let cases: Vec<(&str, Fault, usize, bool)> = vec![
        // (name, fault, times, the client must still get the whole blob)
        ("status503", Fault::Status(503), 1, false),
        ("status500", Fault::Status(500), 1, false),
        ("reset-once", Fault::Reset(1 << 20), 1, true),
        ("reset-always", Fault::Reset(1 << 20), 100, false),
        ("corrupt", Fault::Corrupt, 1, false),
        (
            "latency",
            Fault::Latency(Duration::from_millis(300)),
            1,
            true,
        ),
        ("stall", Fault::Stall(Duration::from_secs(2)), 1, true),
    ];
    for (i, (name, fault, times, must_succeed)) in cases.into_iter().enumerate() {
        let data = random_bytes(6 << 20, 500 + i as u64);
        let digest = push_blob(&origin.url(), "faults/reg", data).await;
        faults.inject(&digest, fault, times);
        let path = format!("/v2/faults/reg/blobs/{digest}");
        let (status, got) = fetch(&proxy, &path).await;
        if must_succeed {
            assert_eq!(
                (status, got.as_deref()),
                (200, Some(digest.as_str())),
                "{name}"
            );
        } else {
            // Either a failed response or a broken body: never the wrong bytes, cleanly.
            if status == 200 {
                assert!(
                    got.is_none() || got.as_deref() == Some(digest.as_str()),
                    "{name}: a clean body must be right"
                );
            } else {
                assert!(status >= 500, "{name}: {status}");
            }
        }
        // Nothing wrong is stored: either nothing, or the right bytes.
        assert!(fills_settled(&proxy).await, "{name}: the fill ended");
        let stored = proxy.blob_path(&digest);
        if stored.exists() {
            assert_eq!(
                format!("sha256:{}", sha256_hex(&std::fs::read(&stored).unwrap())),
                digest,
                "{name}"
            );
        } else {
            assert!(!must_succeed, "{name}: a good transfer is stored");
        }
        assert!(healthy(&proxy).await, "{name}: still serving");
        // With the fault gone, the next pull is right.
        faults.inject("", Fault::None, 0);
        assert_eq!(
            fetch(&proxy, &path).await,
            (200, Some(digest.clone())),
            "{name}: after the fault"
        );
    }
    // A corrupted manifest is refused, not stored.
    origin.push(&[("small-1.0", "library/small:1.0", false)]);
    faults.inject("/manifests/", Fault::Corrupt, 1);
    let (status, _) = fetch(&proxy, &format!("/v2/library/small/manifests/{SMALL}")).await;
    assert!(status >= 500, "corrupted manifest answered {status}");
    assert!(!proxy.blob_path(SMALL).exists());
    assert!(verify_pull(&proxy.host(), "library/small:1.0", SMALL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, moto"]
async fn s3_engine_faults_never_yield_wrong_bytes() {
    use common::regions::Moto;
    let s3 = Moto::start(None, "127.0.0.1");
    let writer = Origin::start_s3(&s3.endpoint());
    let faults = FaultProxy::start(&s3.endpoint()).await;
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: local\n  engines:\n    local: {{ url: \"file://{{DIR}}/data\" }}\n    near: {}\n",
        s3.engine_yaml(Some(&faults.url()))
    );
    let proxy = Proxy::start(&cfg);
    let cases: Vec<(&str, Fault, usize)> = vec![
        ("status503", Fault::Status(503), 1),
        ("reset", Fault::Reset(1 << 20), 1),
        ("corrupt", Fault::Corrupt, 1),
        ("latency", Fault::Latency(Duration::from_millis(200)), 1),
    ];
    for (i, (name, fault, times)) in cases.into_iter().enumerate() {
        let digest = push_blob(
            &writer.url(),
            "faults/s3",
            random_bytes(6 << 20, 900 + i as u64),
        )
        .await;
        faults.inject(digest.trim_start_matches("sha256:"), fault, times);
        let (status, got) = fetch(&proxy, &format!("/v2/faults/s3/blobs/{digest}")).await;
        if status == 200 {
            assert!(
                got.is_none() || got.as_deref() == Some(digest.as_str()),
                "{name}: wrong bytes served cleanly"
            );
        }
        assert!(fills_settled(&proxy).await, "{name}: the fill ended");
        let stored = proxy.blob_path(&digest);
        if stored.exists() {
            assert_eq!(
                format!("sha256:{}", sha256_hex(&std::fs::read(&stored).unwrap())),
                digest,
                "{name}"
            );
        }
        assert!(healthy(&proxy).await);
        faults.inject("", Fault::None, 0);
        assert_eq!(
            fetch(&proxy, &format!("/v2/faults/s3/blobs/{digest}")).await,
            (200, Some(digest.clone())),
            "{name}: after"
        );
    }
}
