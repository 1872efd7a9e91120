//! Hostile peers on loopback, and what the tests measure while they run: an upstream whose
//! answers the test writes (floods, lies, trickles), the proxy's resident memory (current and
//! peak, from `/proc`), and a watcher that asks `/healthz` all along and keeps the slowest answer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

// One loopback server and body type for every fake and hostile peer.
#[allow(unused_imports)]
pub use super::fake::{full, serve, Body};

pub fn respond(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    r
}

/// A body of `total` bytes made of `head`, then `fill` repeated, then `tail`, produced as the
/// peer reads it (nothing buffered); `sent` counts the bytes handed to the connection.
pub fn flood(head: &str, fill: &str, tail: &str, total: u64, sent: Arc<AtomicU64>) -> Body {
    let head = Bytes::from(head.to_string());
    let tail = Bytes::from(tail.to_string());
    let chunk = Bytes::from(fill.repeat((64 << 10) / fill.len().max(1)));
    let body_len = total.saturating_sub((head.len() + tail.len()) as u64);
    let n = body_len / chunk.len() as u64;
    let parts = std::iter::once(head)
        .chain(std::iter::repeat_n(chunk, n as usize))
        .chain(std::iter::once(tail));
    let s = futures::stream::iter(parts).map(move |b| {
        sent.fetch_add(b.len() as u64, Ordering::SeqCst);
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(b))
    });
    BodyExt::boxed(StreamBody::new(s))
}

/// A body that sends one byte of `data` every `every`.
pub fn trickle(data: &'static [u8], every: Duration) -> Body {
    let s = futures::stream::iter(data.iter().copied()).then(move |b| async move {
        tokio::time::sleep(every).await;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(vec![b])))
    });
    BodyExt::boxed(StreamBody::new(s))
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resident memory of `pid` now, in MiB.
pub fn rss_mib(pid: u32) -> u64 {
    proc_kib(pid, "VmRSS") / 1024
}

/// Peak resident memory of `pid` since it started, in MiB.
pub fn peak_mib(pid: u32) -> u64 {
    proc_kib(pid, "VmHWM") / 1024
}

/// The budget of the issue: peak RSS under a hostile test stays under 128 MiB over the idle
/// process.
pub const RSS_BUDGET_MIB: u64 = 128;

/// Fails when `pid`'s peak RSS went more than [`RSS_BUDGET_MIB`] over `idle_mib`.
pub fn assert_peak_within_budget(pid: u32, idle_mib: u64, what: &str) {
    let peak = peak_mib(pid);
    assert!(
        peak < idle_mib + RSS_BUDGET_MIB,
        "{what}: peak RSS {peak} MiB, idle {idle_mib} MiB (budget {RSS_BUDGET_MIB} MiB over idle)"
    );
}

/// Asks `/healthz` every 50 ms on fresh connections until dropped; `slowest()` is the slowest
/// answer seen (a failed or refused request counts as a minute).
pub struct HealthWatch {
    stop: Arc<AtomicBool>,
    slowest_ms: Arc<AtomicU64>,
    asked: Arc<AtomicU64>,
    /// Answers slower than [`HealthWatch::LATE_MS`].
    late: Arc<AtomicU64>,
}

impl HealthWatch {
    pub fn start(url: String) -> HealthWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let slowest_ms = Arc::new(AtomicU64::new(0));
        let asked = Arc::new(AtomicU64::new(0));
        let late = Arc::new(AtomicU64::new(0));
        let (s, w, a, l) = (
            stop.clone(),
            slowest_ms.clone(),
            asked.clone(),
            late.clone(),
        );
        // A thread and runtime of its own: the hostile peers of the test (which may be busy
        // pushing hundreds of MB) must not delay the watcher itself.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let c = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(60))
                    .pool_max_idle_per_host(0)
                    .build()
                    .expect("client");
                while !s.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    let ok = c
                        .get(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    let ms = if ok {
                        t.elapsed().as_millis() as u64
                    } else {
                        60_000
                    };
                    w.fetch_max(ms, Ordering::SeqCst);
                    a.fetch_add(1, Ordering::SeqCst);
                    if ms > HealthWatch::LATE_MS {
                        l.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        });
        HealthWatch {
            stop,
            slowest_ms,
            asked,
            late,
        }
    }

    /// What a health checker needs: an answer within 100 ms.
    pub const LATE_MS: u64 = 100;

    /// `/healthz` answered within [`HealthWatch::LATE_MS`] throughout: every answer came, none took
    /// a second, and at most one in ten (at least one allowed) took over 100 ms. The test's own
    /// client shares two cores with the server and the hostile peer, so a single scheduler
    /// hiccup is not taken for a starved health check; a starved one misses for every request.
    pub async fn assert_answered_in_time(&self) {
        let slowest = self.slowest().await;
        let asked = self.asked.load(Ordering::SeqCst);
        let late = self.late.load(Ordering::SeqCst);
        eprintln!(
            "/healthz: {asked} asked, {late} over {} ms, slowest {slowest:?}",
            Self::LATE_MS
        );
        assert!(
            slowest < Duration::from_secs(1),
            "/healthz took {slowest:?}"
        );
        assert!(
            late <= (asked / 10).max(1),
            "/healthz: {late} of {asked} answers over {} ms (slowest {slowest:?})",
            Self::LATE_MS
        );
    }

    /// The slowest answer so far, after at least one was had.
    pub async fn slowest(&self) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.asked.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Duration::from_millis(self.slowest_ms.load(Ordering::SeqCst))
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
