//! An upstream's health as its answers tell it, and what ociedge does about it (issue 21):
//!
//! - **Back-off**: a `429` or `503` with `Retry-After` — no request goes to the upstream until
//!   then; callers get [`EngineError::Backoff`] at once (the client: `429 TOOMANYREQUESTS` or
//!   `503 UNAVAILABLE` with `Retry-After`; a tag with a stale copy is served stale).
//! - **Circuit breaker**: after `down_after` consecutive failures (5xx, timeouts, resets,
//!   refused connections) the upstream is not called for a back-off that doubles (with jitter)
//!   up to `backoff_max`; one background request (`GET /v2/`) probes it then (half-open) and
//!   closes the breaker when it answers.
//! - **Quota**: the quota the upstream announces (`ratelimit.rs`), per credential (anonymous,
//!   or the configured user name; never a secret); [`Health::quota_low`] says when the
//!   remaining quota is under `ratelimit_reserve`.
//!
//! Every request of the upstream's [`super::RegistryClient`] asks [`Health::admit`] first and
//! reports its outcome; nothing else (nearness probes included) reaches an upstream that is
//! backing off.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, StatusCode};

use super::ratelimit::Quota;
use crate::error::{Backoff, EngineError};
use crate::metrics::Metrics;

/// The credential label of requests made without credentials.
pub const ANONYMOUS: &str = "anonymous";

/// The first back-off of an opened breaker; it doubles with each failed probe.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest `Retry-After` honoured (Docker Hub's pull window).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);
/// The back-off after a `429` that says no `Retry-After` (RFC 6585 makes it optional; Docker
/// Hub's pull-limit answers often omit it): asking again at once only spends more of a quota
/// that is already gone, so the upstream is left alone for this long.
const DEFAULT_429_BACKOFF: Duration = Duration::from_secs(60);
/// How long a quota reading under the reserve is trusted: then one request may go (and read
/// the quota anew), so a window that reset is seen even when every tag is served stale.
const QUOTA_TRUSTED: Duration = Duration::from_secs(60);
/// How long the background probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// `upstreams[].down_after`, `backoff_max`, `ratelimit_reserve`.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Consecutive failures that open the breaker (at least 1).
    pub down_after: u32,
    /// The longest back-off of an open breaker.
    pub backoff_max: Duration,
    /// The fraction (0–1) of the quota kept in reserve: below it, tags are served stale.
    pub reserve: f64,
}

impl Settings {
    /// An upstream's `down_after`, `backoff_max` and `ratelimit_reserve`.
    pub fn of(u: &crate::config::UpstreamConfig) -> Settings {
        Settings {
            down_after: u.down_after,
            backoff_max: u.backoff_max.0,
            reserve: u.ratelimit_reserve.0 / 100.0,
        }
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            down_after: 5,
            backoff_max: Duration::from_secs(60),
            reserve: 0.1,
        }
    }
}

/// The breaker's state; its `/metrics` value is 0, 1, 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// The background probe is asking.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }

    fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
struct State {
    breaker: BreakerState,
    /// Consecutive failures (reset by any answer that is not one).
    failures: u32,
    /// Openings since the breaker last closed: the back-off doubles with each.
    streak: u32,
    openings: u64,
    /// Until when an open breaker refuses (then the probe asks).
    open_until: Option<Instant>,
    /// A `Retry-After`: until when, and whether it came with a `429`.
    retry_after: Option<(Instant, bool)>,
    last_error: Option<String>,
    /// The quota announced last, per credential, and when.
    quotas: BTreeMap<String, (Quota, Instant)>,
    /// The credential of the last request that announced a quota.
    credential: Option<String>,
}

/// One upstream's health (see the module doc). Shared by its client, the pull path and the
/// status page.
#[derive(Debug)]
pub struct Health {
    id: String,
    settings: Settings,
    state: Mutex<State>,
    metrics: Option<Metrics>,
    /// How the background probe reaches the upstream: its HTTP client and `/v2/` URL.
    probe: Mutex<Option<(reqwest::Client, String)>>,
}

impl Health {
    pub fn new(id: &str, settings: Settings) -> Health {
        Health {
            id: id.to_string(),
            settings: Settings {
                down_after: settings.down_after.max(1),
                ..settings
            },
            state: Mutex::new(State {
                breaker: BreakerState::Closed,
                failures: 0,
                streak: 0,
                openings: 0,
                open_until: None,
                retry_after: None,
                last_error: None,
                quotas: BTreeMap::new(),
                credential: None,
            }),
            metrics: None,
            probe: Mutex::new(None),
        }
    }

    /// Records the breaker's state and openings in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Health {
        metrics.breaker_state(&self.id, 0);
        self.metrics = Some(metrics);
        self
    }

    /// How the background probe reaches the upstream (`url`: its `/v2/`).
    pub fn set_probe(&self, http: reqwest::Client, url: String) {
        if let Ok(mut p) = self.probe.lock() {
            *p = Some((http, url));
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Ok` when a request may go to the upstream now; else why not and until when (answered
    /// at once, without asking it).
    pub fn admit(&self) -> Result<(), EngineError> {
        let now = Instant::now();
        let s = self.state();
        let mut refusal: Option<Backoff> = None;
        if let Some((until, rate_limited)) = s.retry_after {
            if until > now {
                refusal = Some(Backoff {
                    until,
                    rate_limited,
                    why: format!(
                        "upstream {} asked us to come back later (Retry-After)",
                        self.id
                    )
                    .into(),
                });
            }
        }
        if s.breaker != BreakerState::Closed {
            // Half-open: the probe is asking; until it answers, one back-off step more.
            let until = s
                .open_until
                .filter(|u| *u > now)
                .unwrap_or(now + FIRST_BACKOFF);
            if refusal.as_ref().is_none_or(|r| r.until < until) {
                refusal = Some(Backoff {
                    until,
                    rate_limited: false,
                    why: format!(
                        "upstream {} is down (circuit breaker open after {} consecutive failures)",
                        self.id, self.settings.down_after
                    )
                    .into(),
                });
            }
        }
        match refusal {
            Some(b) => Err(EngineError::Backoff(b)),
            None => Ok(()),
        }
    }

    /// An answer of the upstream: its quota (for `credential`), a `Retry-After` on a `429` or
    /// `503`, and a failure (5xx) or not.
    pub fn answered(self: &Arc<Self>, status: StatusCode, headers: &HeaderMap, credential: &str) {
        if let Some(q) = super::ratelimit::quota(headers) {
            if let Some(m) = &self.metrics {
                m.upstream_quota(&self.id, credential, q.limit, q.remaining);
            }
            let mut s = self.state();
            s.quotas.insert(credential.to_string(), (q, Instant::now()));
            s.credential = Some(credential.to_string());
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            let wait = match retry_after(headers) {
                Some(w) => Some(w),
                None if status == StatusCode::TOO_MANY_REQUESTS => Some(DEFAULT_429_BACKOFF),
                None => None,
            };
            if let Some(wait) = wait {
                let until = Instant::now() + wait.min(MAX_RETRY_AFTER);
                let rate_limited = status == StatusCode::TOO_MANY_REQUESTS;
                tracing::warn!(upstream = %self.id, %status, secs = wait.as_secs(), "upstream asked to back off");
                let mut s = self.state();
                if s.retry_after.is_none_or(|(u, _)| u < until) {
                    s.retry_after = Some((until, rate_limited));
                }
            }
        }
        if status.is_server_error() {
            self.failed(&format!("answered {status}"));
        } else {
            self.state().failures = 0;
        }
    }

    /// A request that got no answer (refused or reset connection, timeout) or a 5xx: counts
    /// towards opening the breaker.
    pub fn failed(self: &Arc<Self>, why: &str) {
        let opened = {
            let mut s = self.state();
            s.last_error = Some(why.to_string());
            if s.breaker != BreakerState::Closed {
                return;
            }
            s.failures += 1;
            if s.failures < self.settings.down_after {
                return;
            }
            s.openings += 1;
            self.open(&mut s);
            true
        };
        if opened {
            tracing::warn!(upstream = %self.id, failures = self.settings.down_after, why, "circuit breaker open: the upstream is not called until a probe finds it back");
            if let Some(m) = &self.metrics {
                m.breaker_opened(&self.id);
            }
            if tokio::runtime::Handle::try_current().is_ok() {
                tokio::spawn(self.clone().probe_loop());
            }
        }
    }

    /// Opens (or re-opens) the breaker for the next back-off step.
    fn open(&self, s: &mut State) {
        let step = FIRST_BACKOFF
            .saturating_mul(1u32 << s.streak.min(20))
            .min(self.settings.backoff_max.max(FIRST_BACKOFF));
        // Equal jitter: half the step, plus up to the other half at random.
        let jittered = step / 2 + step.mul_f64(rand::random::<f64>() / 2.0);
        s.streak = s.streak.saturating_add(1);
        s.breaker = BreakerState::Open;
        s.open_until = Some(Instant::now() + jittered);
        if let Some(m) = &self.metrics {
            m.breaker_state(&self.id, BreakerState::Open.gauge());
        }
    }

    fn set(&self, s: &mut State, b: BreakerState) {
        s.breaker = b;
        if let Some(m) = &self.metrics {
            m.breaker_state(&self.id, b.gauge());
        }
    }

    /// While open: waits out the back-off, then asks `GET /v2/` once (half-open); closes on an
    /// answer that is not a 5xx, else opens again for a longer back-off.
    async fn probe_loop(self: Arc<Self>) {
        loop {
            let until = self.state().open_until.unwrap_or_else(Instant::now);
            tokio::time::sleep_until(until.into()).await;
            {
                let mut s = self.state();
                self.set(&mut s, BreakerState::HalfOpen);
            }
            let probe = self.probe.lock().ok().and_then(|p| p.clone());
            let outcome = match probe {
                Some((http, url)) => {
                    match tokio::time::timeout(PROBE_TIMEOUT, http.get(&url).send()).await {
                        Ok(Ok(r)) if !r.status().is_server_error() => Ok(()),
                        Ok(Ok(r)) => Err(format!("probe answered {}", r.status())),
                        Ok(Err(e)) => Err(format!("probe failed: {e}")),
                        Err(_) => Err("probe timed out".to_string()),
                    }
                }
                // Nothing to probe with (a unit test): close, and let requests tell.
                None => Ok(()),
            };
            let mut s = self.state();
            match outcome {
                Ok(()) => {
                    s.failures = 0;
                    s.streak = 0;
                    s.open_until = None;
                    self.set(&mut s, BreakerState::Closed);
                    drop(s);
                    tracing::info!(upstream = %self.id, "circuit breaker closed: the upstream answers again");
                    return;
                }
                Err(why) => {
                    tracing::debug!(upstream = %self.id, why, "upstream still down");
                    s.last_error = Some(why);
                    self.open(&mut s);
                }
            }
        }
    }

    pub fn breaker(&self) -> BreakerState {
        self.state().breaker
    }

    /// Whether the remaining quota of the credential in use is under the reserve
    /// (`upstreams[].ratelimit_reserve`): revalidations and prewarming should wait, and tags
    /// with a stale copy are served stale. `false` while no quota was announced, and once the
    /// low reading is a minute old (the next request reads it anew).
    pub fn quota_low(&self) -> bool {
        let s = self.state();
        let Some((q, at)) = s.credential.as_ref().and_then(|c| s.quotas.get(c)) else {
            return false;
        };
        at.elapsed() < QUOTA_TRUSTED
            && q.limit > 0
            && (q.remaining as f64) < (q.limit as f64) * self.settings.reserve
    }

    /// The status page's view: breaker, back-off and quota per credential.
    pub fn snapshot(&self) -> serde_json::Value {
        let low = self.quota_low();
        let now = Instant::now();
        let secs = |u: Instant| u.saturating_duration_since(now).as_secs_f64().ceil() as u64;
        let s = self.state();
        let quota: serde_json::Map<String, serde_json::Value> = s
            .quotas
            .iter()
            .map(|(c, (q, _))| {
                let v = serde_json::json!({ "limit": q.limit, "remaining": q.remaining });
                (c.clone(), v)
            })
            .collect();
        serde_json::json!({
            "breaker": s.breaker.as_str(),
            "consecutive_failures": s.failures,
            "openings": s.openings,
            "down_after": self.settings.down_after,
            "retry_in_s": s.open_until.filter(|_| s.breaker != BreakerState::Closed).map(secs),
            "backoff": s.retry_after.filter(|(u, _)| *u > now).map(|(u, rl)| serde_json::json!({
                "retry_in_s": secs(u),
                "rate_limited": rl,
            })),
            "last_error": s.last_error,
            "quota": quota,
            "credential": s.credential,
            "quota_low": low,
        })
    }
}

/// `Retry-After`: delta-seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn health(down_after: u32) -> Arc<Health> {
        Arc::new(Health::new(
            "up",
            Settings {
                down_after,
                ..Settings::default()
            },
        ))
    }

    #[test]
    fn retry_after_is_honoured_for_429_and_503() {
        let h = health(5);
        h.answered(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "30")]),
            ANONYMOUS,
        );
        match h.admit() {
            Err(EngineError::Backoff(b)) => {
                assert!(b.rate_limited);
                assert!((29..=30).contains(&b.retry_after()), "{}", b.retry_after());
            }
            other => panic!("{other:?}"),
        }
        let h = health(5);
        h.answered(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(&[("retry-after", "5")]),
            ANONYMOUS,
        );
        assert!(matches!(h.admit(), Err(EngineError::Backoff(b)) if !b.rate_limited));
        // A 429 without Retry-After: the default back-off.
        let h = health(5);
        h.answered(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), ANONYMOUS);
        match h.admit() {
            Err(EngineError::Backoff(b)) => {
                assert!(b.rate_limited);
                assert!((59..=60).contains(&b.retry_after()), "{}", b.retry_after());
            }
            other => panic!("{other:?}"),
        }
        // A 404, a 503 without Retry-After (a failure, for the breaker): no back-off.
        let h = health(5);
        h.answered(StatusCode::NOT_FOUND, &HeaderMap::new(), ANONYMOUS);
        h.answered(
            StatusCode::SERVICE_UNAVAILABLE,
            &HeaderMap::new(),
            ANONYMOUS,
        );
        assert!(h.admit().is_ok());
    }

    #[tokio::test]
    async fn the_breaker_opens_after_down_after_consecutive_failures() {
        let h = health(3);
        h.failed("refused");
        h.failed("refused");
        // An answer in between resets the count.
        h.answered(StatusCode::OK, &HeaderMap::new(), ANONYMOUS);
        h.failed("refused");
        h.failed("refused");
        assert!(h.admit().is_ok());
        assert_eq!(h.breaker(), BreakerState::Closed);
        h.answered(StatusCode::BAD_GATEWAY, &HeaderMap::new(), ANONYMOUS);
        assert_eq!(h.breaker(), BreakerState::Open);
        match h.admit() {
            Err(EngineError::Backoff(b)) => {
                assert!(!b.rate_limited);
                assert_eq!(b.retry_after(), 1);
            }
            other => panic!("{other:?}"),
        }
        // No probe client: the probe closes it after the first back-off.
        tokio::time::timeout(Duration::from_secs(5), async {
            while h.breaker() != BreakerState::Closed {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("closed after the back-off");
        assert!(h.admit().is_ok());
    }

    #[test]
    fn the_back_off_grows_to_the_cap() {
        let h = Health::new(
            "up",
            Settings {
                down_after: 1,
                backoff_max: Duration::from_secs(8),
                reserve: 0.1,
            },
        );
        let mut s = h.state();
        let mut longest = Duration::ZERO;
        for _ in 0..10 {
            h.open(&mut s);
            let d = s.open_until.unwrap() - Instant::now();
            assert!(d <= Duration::from_secs(8), "{d:?}");
            longest = longest.max(d);
        }
        assert!(longest >= Duration::from_secs(3), "{longest:?}");
    }

    #[test]
    fn the_quota_is_low_under_the_reserve_of_the_credential_in_use() {
        let h = health(5);
        assert!(!h.quota_low(), "no quota announced");
        let q = |r: &str| {
            headers(&[
                ("ratelimit-limit", "100;w=21600"),
                ("ratelimit-remaining", r),
            ])
        };
        h.answered(StatusCode::OK, &q("5;w=21600"), ANONYMOUS);
        assert!(h.quota_low());
        h.answered(StatusCode::OK, &q("50;w=21600"), "bot");
        assert!(!h.quota_low(), "the credential in use has quota");
        let snap = h.snapshot();
        assert_eq!(snap["quota"]["anonymous"]["remaining"], 5);
        assert_eq!(snap["quota"]["bot"]["remaining"], 50);
        assert_eq!(snap["credential"], "bot");
    }
}
