//! The last hour of traffic, kept in memory for the status page (`/_ociedge/`).
//!
//! Prometheus keeps the real history; this ring buffer exists so that an operator who opens the
//! page on a machine without a Prometheus (a laptop, a new region) still sees the hit ratio and
//! the bytes served by source over the last hour. A background task ([`run`]) reads the
//! process's own counters every [`INTERVAL`] and stores the difference from the previous reading
//! as one [`Sample`]; [`CAPACITY`] samples make the hour. The counters are cumulative, so a
//! sampler that is late or skips a tick loses no bytes: the next sample simply covers a longer
//! interval, and says so in [`Sample::secs`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::metrics::Metrics;

/// One sample per interval…
pub const INTERVAL: Duration = Duration::from_secs(10);
/// …for an hour.
pub const CAPACITY: usize = 360;

/// What happened during one interval. Counts, not rates: the page divides by `secs`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Sample {
    /// End of the interval, in Unix seconds.
    pub t: f64,
    /// Length of the interval in seconds (the live sample, and one after a late tick, differ
    /// from [`INTERVAL`]).
    pub secs: f64,
    /// Blob and manifest lookups answered by the local engine. Tag lookups are left out: they
    /// are revalidated on a timer and would say nothing about what the cache holds.
    pub hits: u64,
    /// Blob and manifest lookups that had to go to a remote engine.
    pub misses: u64,
    /// Body bytes sent to clients, by source (`local` or an engine id); zeros left out.
    pub served: BTreeMap<String, u64>,
    /// Bytes fetched from each remote engine (fills and pass-through); zeros left out.
    pub fetched: BTreeMap<String, u64>,
}

/// Cumulative counter values at one instant, as read from [`Metrics`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub hits: u64,
    pub misses: u64,
    pub served: BTreeMap<String, u64>,
    pub fetched: BTreeMap<String, u64>,
}

impl Totals {
    /// Reads the counters the history is made of. `sources` are the labels bytes may be served
    /// from (`local` and every engine id); `engines` the remote engines bytes are fetched from.
    pub fn read(metrics: &Metrics, sources: &[String], engines: &[String]) -> Totals {
        let content = ["blob", "manifest"];
        Totals {
            hits: content.map(|k| metrics.cache_count(k, "hit")).iter().sum(),
            misses: content.map(|k| metrics.cache_count(k, "miss")).iter().sum(),
            served: sources
                .iter()
                .map(|s| (s.clone(), metrics.bytes_served_total(s)))
                .collect(),
            fetched: engines
                .iter()
                .map(|e| (e.clone(), metrics.engine_bytes_total(e)))
                .collect(),
        }
    }

    /// What happened between `prev` and `self`. Counters only grow, but a saturating
    /// difference keeps a surprise (a counter family cleared) from turning into 2^64 bytes.
    fn since(&self, prev: &Totals, t: f64, secs: f64) -> Sample {
        let diff = |cur: &BTreeMap<String, u64>, old: &BTreeMap<String, u64>| {
            cur.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.saturating_sub(old.get(k).copied().unwrap_or(0)),
                    )
                })
                .filter(|(_, v)| *v > 0)
                .collect()
        };
        Sample {
            t,
            secs,
            hits: self.hits.saturating_sub(prev.hits),
            misses: self.misses.saturating_sub(prev.misses),
            served: diff(&self.served, &prev.served),
            fetched: diff(&self.fetched, &prev.fetched),
        }
    }
}

/// The status JSON's `history` field.
#[derive(Clone, Debug, serde::Serialize)]
pub struct View {
    /// Server time in Unix seconds: the page measures ages against it, not its own clock.
    pub now: f64,
    pub interval_seconds: u64,
    pub window_seconds: u64,
    /// Oldest first; the last one is the live, partial interval since the last tick.
    pub samples: Vec<Sample>,
}

struct State {
    samples: VecDeque<Sample>,
    /// The reading the next sample is measured from.
    last: Option<(Instant, Totals)>,
}

/// The ring buffer. Cheap to share; one lock, held for a copy at most.
pub struct History {
    state: Mutex<State>,
    capacity: usize,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("History")
    }
}

impl Default for History {
    fn default() -> Self {
        History::new(CAPACITY)
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            state: Mutex::new(State {
                samples: VecDeque::with_capacity(capacity),
                last: None,
            }),
            capacity: capacity.max(1),
        }
    }

    /// Records a reading taken at `at`. The first reading only sets the baseline: counts from
    /// before the process was sampled have no interval to belong to.
    pub fn record(&self, totals: Totals, at: Instant, t: f64) {
        let Ok(mut s) = self.state.lock() else { return };
        if let Some((prev_at, prev)) = &s.last {
            let secs = at.saturating_duration_since(*prev_at).as_secs_f64();
            let sample = totals.since(prev, t, secs);
            if s.samples.len() == self.capacity {
                s.samples.pop_front();
            }
            s.samples.push_back(sample);
        }
        s.last = Some((at, totals));
    }

    /// The stored samples, plus the live interval since the last tick when `live` (the
    /// counters now) is given, so the page shows traffic seconds after it happened.
    pub fn view(&self, live: Option<Totals>) -> View {
        let now = unix_now();
        let Ok(s) = self.state.lock() else {
            return View {
                now,
                interval_seconds: INTERVAL.as_secs(),
                window_seconds: INTERVAL.as_secs() * self.capacity as u64,
                samples: Vec::new(),
            };
        };
        let mut samples: Vec<Sample> = s.samples.iter().cloned().collect();
        if let (Some(live), Some((prev_at, prev))) = (live, &s.last) {
            let secs = prev_at.elapsed().as_secs_f64();
            if secs > 0.0 {
                samples.push(live.since(prev, now, secs));
            }
        }
        View {
            now,
            interval_seconds: INTERVAL.as_secs(),
            window_seconds: INTERVAL.as_secs() * self.capacity as u64,
            samples,
        }
    }
}

/// Samples `metrics` into `history` every [`INTERVAL`], forever (spawn it).
pub async fn run(
    history: Arc<History>,
    metrics: Metrics,
    sources: Vec<String>,
    engines: Vec<String>,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    // A late tick makes one longer sample, not a burst of short ones.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let totals = Totals::read(&metrics, &sources, &engines);
        history.record(totals, Instant::now(), unix_now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(hits: u64, misses: u64, local: u64, us: u64) -> Totals {
        Totals {
            hits,
            misses,
            served: [("local".to_string(), local), ("us".to_string(), us)].into(),
            fetched: [("us".to_string(), us)].into(),
        }
    }

    #[test]
    fn samples_are_differences_and_the_ring_keeps_the_last_ones() {
        let h = History::new(3);
        let t0 = Instant::now();
        h.record(totals(5, 1, 100, 0), t0, 1000.0);
        assert!(
            h.view(None).samples.is_empty(),
            "the first reading is a baseline"
        );
        for i in 1..=5u64 {
            h.record(
                totals(5 + i, 1 + 2 * i, 100 + 10 * i, 7 * i),
                t0 + INTERVAL * i as u32,
                1000.0 + 10.0 * i as f64,
            );
        }
        let v = h.view(None);
        assert_eq!(v.samples.len(), 3, "capacity");
        let s = &v.samples[2];
        assert_eq!((s.t, s.secs, s.hits, s.misses), (1050.0, 10.0, 1, 2));
        assert_eq!(s.served["local"], 10);
        assert_eq!(s.fetched["us"], 7);
        assert_eq!(v.samples[0].t, 1030.0, "oldest first");
        assert_eq!(v.window_seconds, 30);
    }

    #[test]
    fn zeros_are_left_out_and_a_shrinking_counter_does_not_wrap() {
        let h = History::new(10);
        let t0 = Instant::now();
        h.record(totals(5, 5, 100, 50), t0, 0.0);
        h.record(totals(5, 4, 100, 60), t0 + INTERVAL, 10.0);
        let s = &h.view(None).samples[0];
        assert_eq!((s.hits, s.misses), (0, 0));
        assert!(!s.served.contains_key("local"));
        assert_eq!(s.served["us"], 10);
    }

    #[test]
    fn the_live_sample_covers_the_time_since_the_last_tick() {
        let h = History::new(10);
        assert!(h.view(Some(totals(1, 1, 1, 1))).samples.is_empty());
        h.record(
            totals(0, 0, 0, 0),
            Instant::now() - Duration::from_secs(4),
            0.0,
        );
        let v = h.view(Some(totals(3, 1, 4096, 0)));
        let live = v.samples.last().expect("live sample");
        assert!(live.secs >= 4.0 && live.secs < 60.0, "{}", live.secs);
        assert_eq!((live.hits, live.misses), (3, 1));
        assert_eq!(live.served["local"], 4096);
        assert!(v.now > 1.6e9);
    }

    #[test]
    fn totals_come_from_the_exported_counters() {
        let m = Metrics::new();
        m.cache("blob", "hit");
        m.cache("manifest", "hit");
        m.cache("tag", "hit");
        m.cache("blob", "miss");
        m.bytes_served(&Arc::from("local"), 10);
        m.bytes_served(&Arc::from("us"), 5);
        m.engine_bytes("us", 7);
        let t = Totals::read(
            &m,
            &["local".into(), "us".into(), "ap".into()],
            &["us".into()],
        );
        assert_eq!((t.hits, t.misses), (2, 1), "tag lookups are not content");
        assert_eq!(t.served["local"], 10);
        assert_eq!(t.served["us"], 5);
        assert_eq!(t.served["ap"], 0);
        assert_eq!(t.fetched["us"], 7);
    }
}
