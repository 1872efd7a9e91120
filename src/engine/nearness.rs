//! Nearness: which remote engine to ask first, measured rather than declared.
//!
//! A background prober sends each engine its cheap `probe` request every interval, keeps an
//! exponentially smoothed round-trip time and a count of consecutive failures; `down_after`
//! failures in a row mark an engine down (ranked last, skipped by probes' verdict until one
//! succeeds again). The ranking orders by health, then RTT rounded to the millisecond, then the
//! configured `priority`, so ties between equally near engines go to the preferred one.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::Engine;
use crate::metrics::Metrics;

/// Weight of a new RTT sample in the moving average.
const EWMA_ALPHA: f64 = 0.3;

#[derive(Clone, Copy, Debug)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub down_after: u32,
}

/// What is known about one engine.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Smoothed RTT in seconds; `None` before the first successful probe.
    pub rtt: Option<f64>,
    pub consecutive_failures: u32,
    pub up: bool,
    pub last_error: Option<String>,
    pub priority: i32,
    pub probes: u64,
    pub last_probe: Option<Instant>,
}

#[derive(Debug)]
pub struct Nearness {
    engines: Vec<Arc<dyn Engine>>,
    state: RwLock<HashMap<String, Health>>,
    settings: ProbeSettings,
    metrics: Metrics,
}

impl Nearness {
    /// `engines` with their priorities (lower first on ties). Every engine starts up, unmeasured.
    pub fn new(
        engines: Vec<(Arc<dyn Engine>, i32)>,
        settings: ProbeSettings,
        metrics: Metrics,
    ) -> Nearness {
        let state = engines
            .iter()
            .map(|(e, p)| {
                (
                    e.id().to_string(),
                    Health {
                        up: true,
                        priority: *p,
                        ..Default::default()
                    },
                )
            })
            .collect();
        Nearness {
            engines: engines.into_iter().map(|(e, _)| e).collect(),
            state: RwLock::new(state),
            settings,
            metrics,
        }
    }

    pub fn settings(&self) -> ProbeSettings {
        self.settings
    }

    pub fn health(&self, id: &str) -> Option<Health> {
        self.state.read().ok()?.get(id).cloned()
    }

    pub fn is_up(&self, id: &str) -> bool {
        self.health(id).is_none_or(|h| h.up)
    }

    /// Probes every engine once, concurrently.
    pub async fn probe_all(&self) {
        let probes = self.engines.iter().map(|e| async move {
            let start = Instant::now();
            let res = tokio::time::timeout(self.settings.timeout, e.probe()).await;
            let result = match res {
                Ok(Ok(())) => Ok(start.elapsed()),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err(format!("probe timed out after {:?}", self.settings.timeout)),
            };
            self.record(e.id(), result);
        });
        futures::future::join_all(probes).await;
    }

    /// Records a probe result (also used by tests).
    pub fn record(&self, id: &str, result: Result<Duration, String>) {
        let Ok(mut map) = self.state.write() else {
            return;
        };
        let h = map.entry(id.to_string()).or_default();
        h.probes += 1;
        h.last_probe = Some(Instant::now());
        match result {
            Ok(rtt) => {
                let s = rtt.as_secs_f64();
                h.rtt = Some(match h.rtt {
                    Some(old) => old * (1.0 - EWMA_ALPHA) + s * EWMA_ALPHA,
                    None => s,
                });
                if !h.up {
                    tracing::info!(engine = id, "engine is up again");
                }
                h.up = true;
                h.consecutive_failures = 0;
                h.last_error = None;
            }
            Err(e) => {
                h.consecutive_failures += 1;
                if h.up && h.consecutive_failures >= self.settings.down_after {
                    tracing::warn!(engine = id, error = %e, "engine marked down");
                    h.up = false;
                }
                h.last_error = Some(e);
            }
        }
        self.metrics.engine_health(id, h.rtt, h.up);
    }

    /// Sort key: down last, then RTT in whole milliseconds (unmeasured after measured), then
    /// priority, then the exact RTT.
    fn key(&self, map: &HashMap<String, Health>, id: &str) -> (bool, u64, i32, u64) {
        match map.get(id) {
            Some(h) => {
                let ms = h
                    .rtt
                    .map(|r| (r * 1000.0).round() as u64)
                    .unwrap_or(u64::MAX);
                let us = h.rtt.map(|r| (r * 1e6) as u64).unwrap_or(u64::MAX);
                (!h.up, ms, h.priority, us)
            }
            None => (false, u64::MAX, 0, u64::MAX),
        }
    }

    /// Orders `items` nearest first (stable for equal keys).
    pub fn rank<T>(&self, items: &mut [T], id: impl Fn(&T) -> &str) {
        let Ok(map) = self.state.read() else { return };
        items.sort_by_key(|t| self.key(&map, id(t)));
    }

    /// Every probed engine, nearest first: (id, health).
    pub fn ranking(&self) -> Vec<(String, Health)> {
        let Ok(map) = self.state.read() else {
            return Vec::new();
        };
        let mut v: Vec<(String, Health)> =
            map.iter().map(|(k, h)| (k.clone(), h.clone())).collect();
        v.sort_by_key(|(k, _)| self.key(&map, k));
        v
    }

    /// Runs the prober forever (spawn it).
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.probe_all().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::storage::StorageEngine;

    fn engine(id: &str) -> Arc<dyn Engine> {
        Arc::new(StorageEngine::from_store(
            id,
            Arc::new(object_store::memory::InMemory::new()),
        ))
    }

    #[test]
    fn ranking_follows_rtt_health_and_priority() {
        let settings = ProbeSettings {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            down_after: 2,
        };
        let n = Nearness::new(
            vec![(engine("a"), 0), (engine("b"), 0), (engine("c"), -1)],
            settings,
            Metrics::new(),
        );
        n.record("a", Ok(Duration::from_millis(50)));
        n.record("b", Ok(Duration::from_millis(5)));
        n.record("c", Ok(Duration::from_micros(5200)));
        let ids = |n: &Nearness| n.ranking().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        // b and c tie at 5 ms; c has the better priority.
        assert_eq!(ids(&n), ["c", "b", "a"]);
        // Two failures mark c down: last.
        n.record("c", Err("x".into()));
        assert_eq!(ids(&n)[0], "c");
        n.record("c", Err("x".into()));
        assert_eq!(ids(&n), ["b", "a", "c"]);
        assert!(!n.is_up("c"));
        // The moving average follows a change within a few samples.
        for _ in 0..8 {
            n.record("a", Ok(Duration::from_millis(1)));
        }
        assert_eq!(ids(&n)[0], "a");
        n.record("c", Ok(Duration::from_millis(1)));
        assert!(n.is_up("c"));
    }
}
