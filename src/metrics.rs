//! Prometheus metrics: what an operator graphs (request rates and errors by route, bytes by
//! source, hit ratio, fills, upstream errors) and the `/metrics` text encoding.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// The source name of content served from the local engine (the `source` label, the
/// `X-Ociedge-Source` header, the status page).
pub const LOCAL: &str = "local";

/// How a fill ended, as `ociedge_fills_total{result}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillResult {
    /// Verified (and committed, or readers still got good bytes).
    Done,
    /// No engine had the blob.
    NotFound,
    /// The transfer failed or the digest did not match.
    Failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EngineLabels {
    engine: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: Arc<str>,
}

/// (upstream, credential).
type QuotaKey = (Arc<str>, Arc<str>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    upstream: Arc<str>,
    /// `anonymous`, or the configured user name (never a secret): the quota is per credential.
    credential: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamRequestLabels {
    upstream: Arc<str>,
    /// `pull` (a manifest `GET`: what Docker Hub counts against the quota), `head`, `other`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Series handles of the per-request families, kept per thread: a family lookup hashes the
/// labels and takes the family's lock, which every connection of every thread shares. A handle
/// is a clone of the family's own series, so both record into the same numbers.
#[derive(Default)]
struct Hot {
    requests: Vec<(u64, RequestLabels, (Counter, Histogram))>,
    cache: Vec<(u64, CacheLabels, Counter)>,
}

/// More label sets than this per thread are looked up in the family each time (a route table
/// has a few dozen in use).
const HOT_MAX: usize = 128;

/// Records through the handle of `labels` in registry `id`: the one kept in `list`, or one made
/// by `make` (a family lookup) and kept the first time. A full list first drops other
/// registries' handles.
fn with_handle<L: PartialEq, M>(
    list: &mut Vec<(u64, L, M)>,
    id: u64,
    labels: L,
    make: impl FnOnce(&L) -> M,
    record: impl FnOnce(&M),
) {
    if let Some((_, _, m)) = list.iter().find(|(i, l, _)| *i == id && *l == labels) {
        return record(m);
    }
    let m = make(&labels);
    record(&m);
    if list.len() >= HOT_MAX {
        list.retain(|(i, ..)| *i == id);
    }
    if list.len() < HOT_MAX {
        list.push((id, labels, m));
    }
}

thread_local! {
    static HOT: RefCell<Hot> = RefCell::new(Hot::default());
}

/// Tells the registries of one process apart in [`HOT`] (tests run many side by side).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    /// This registry's key in [`HOT`].
    id: u64,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    bytes_served: Family<SourceLabels, Counter>,
    cache: Family<CacheLabels, Counter>,
    fills_in_flight: Gauge,
    fills: Family<ResultLabels, Counter>,
    fills_joined: Counter,
    upstream_errors: Family<EngineLabels, Counter>,
    upstream_requests: Family<UpstreamRequestLabels, Counter>,
    ratelimit_limit: Family<QuotaLabels, Gauge>,
    ratelimit_remaining: Family<QuotaLabels, Gauge>,
    breaker_state: Family<UpstreamLabels, Gauge>,
    breaker_openings: Family<UpstreamLabels, Counter>,
    engine_bytes: Family<EngineLabels, Counter>,
    digest_mismatches: Family<EngineLabels, Counter>,
    range_fetch_bytes: Family<EngineLabels, Counter>,
    range_broken: Counter,
    fill_lent_bytes: Counter,
    stale_tags: Counter,
    engine_rtt: Family<EngineLabels, Gauge<f64, AtomicU64>>,
    engine_up: Family<EngineLabels, Gauge>,
    engine_requests: Family<EngineLabels, Counter>,
    repl_jobs: Family<EngineLabels, Gauge>,
    repl_oldest: Family<EngineLabels, Gauge<f64, AtomicU64>>,
    repl_bytes: Family<EngineLabels, Counter>,
    repl_done: Family<EngineLabels, Counter>,
    repl_failures: Family<EngineLabels, Counter>,
    repl_dead: Family<EngineLabels, Counter>,
    pushes: Family<CacheLabels, Counter>,
    cache_bytes: Gauge,
    cache_entries: Gauge,
    evicted_bytes: Counter,
    evictions: Counter,
    prewarm_running: Gauge,
    prewarm_blobs: Family<EngineLabels, Counter>,
    prewarm_bytes: Family<EngineLabels, Counter>,
    /// The last quota each upstream announced per credential (limit, remaining), for the
    /// status page.
    quotas: std::sync::Mutex<std::collections::BTreeMap<QuotaKey, (u64, u64)>>,
    local_engine_up: Family<EngineLabels, Gauge>,
    cluster_peer_fills: Counter,
    cluster_takeovers: Counter,
    cluster_peer_bytes: Counter,
    /// The local engine's id, once known: its probes also set `local_engine_up`.
    local_engine: OnceLock<Arc<str>>,
}

/// Cheap to clone; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ociedge");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.5, 14))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to response headers, by route",
            duration.clone(),
        );
        let bytes_served = Family::<SourceLabels, Counter>::default();
        registry.register(
            "bytes_served",
            "Body bytes sent to clients, by source (local or engine id)",
            bytes_served.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register("cache_requests", "Lookups in the local engine by kind (blob, manifest, tag) and result (hit, miss, stale, negative: an upstream said moments ago it has no such manifest)", cache.clone());
        let fills_in_flight = Gauge::default();
        registry.register(
            "fills_in_flight",
            "Fills of the local engine running now",
            fills_in_flight.clone(),
        );
        let fills = Family::<ResultLabels, Counter>::default();
        registry.register(
            "fills",
            "Finished fills by result (done, not_found, failed)",
            fills.clone(),
        );
        let fills_joined = Counter::default();
        registry.register(
            "fills_joined",
            "Requests that joined a fill already running for their digest",
            fills_joined.clone(),
        );
        let upstream_errors = Family::<EngineLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed requests to remote engines, by engine",
            upstream_errors.clone(),
        );
        let upstream_requests = Family::<UpstreamRequestLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Requests to upstream registries, by upstream and kind (pull: a manifest GET, which rate-limited registries count; head; other)",
            upstream_requests.clone(),
        );
        let ratelimit_limit = Family::<QuotaLabels, Gauge>::default();
        registry.register(
            "upstream_ratelimit_limit",
            "Pulls an upstream allows per window and credential (anonymous or the configured user), as its last answer announced (ratelimit-limit)",
            ratelimit_limit.clone(),
        );
        let ratelimit_remaining = Family::<QuotaLabels, Gauge>::default();
        registry.register(
            "upstream_ratelimit_remaining",
            "Pulls left in an upstream's window per credential (anonymous or the configured user), as its last answer announced (ratelimit-remaining)",
            ratelimit_remaining.clone(),
        );
        let prewarm_running = Gauge::default();
        registry.register(
            "prewarm_jobs_running",
            "Prewarm jobs running in this process",
            prewarm_running.clone(),
        );
        let prewarm_blobs = Family::<EngineLabels, Counter>::default();
        registry.register(
            "prewarm_blobs",
            "Blobs prewarm jobs brought into an engine (fetched or copied; already present not counted), by engine",
            prewarm_blobs.clone(),
        );
        let prewarm_bytes = Family::<EngineLabels, Counter>::default();
        registry.register(
            "prewarm_bytes",
            "Bytes prewarm jobs brought into an engine, by engine",
            prewarm_bytes.clone(),
        );
        let breaker_state = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_breaker_state",
            "An upstream's circuit breaker: 0 closed, 1 open (not called; misses answer 503 at once, tags are served stale), 2 half-open (a probe is asking)",
            breaker_state.clone(),
        );
        let breaker_openings = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_breaker_openings",
            "Times an upstream's circuit breaker opened (after down_after consecutive failures, or a failed probe)",
            breaker_openings.clone(),
        );
        let engine_bytes = Family::<EngineLabels, Counter>::default();
        registry.register(
            "engine_bytes_received",
            "Bytes fetched from remote engines, by engine",
            engine_bytes.clone(),
        );
        let digest_mismatches = Family::<EngineLabels, Counter>::default();
        registry.register(
            "digest_mismatches",
            "Blobs refused because their bytes did not match the digest, by engine",
            digest_mismatches.clone(),
        );
        let range_fetch_bytes = Family::<EngineLabels, Counter>::default();
        registry.register(
            "range_fetch_bytes",
            "Bytes fetched from remote engines by ranged reads for ranges of cold blobs (beside the fills), by engine",
            range_fetch_bytes.clone(),
        );
        let range_broken = Counter::default();
        registry.register(
            "range_responses_broken",
            "Ranged responses broken in flight because the blob's fill found a digest mismatch",
            range_broken.clone(),
        );
        let fill_lent_bytes = Counter::default();
        registry.register(
            "fill_lent_bytes",
            "Bytes fills took from the ranged reads beside them (written to the spool by those reads) rather than fetching them again",
            fill_lent_bytes.clone(),
        );
        let stale_tags = Counter::default();
        registry.register(
            "stale_tags_served",
            "Tag answers served past tag_ttl because the authority was unreachable",
            stale_tags.clone(),
        );
        let engine_rtt = Family::<EngineLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "engine_rtt_seconds",
            "Smoothed probe round-trip time per engine",
            engine_rtt.clone(),
        );
        let engine_up = Family::<EngineLabels, Gauge>::default();
        registry.register(
            "engine_up",
            "1 when the engine's probes succeed, 0 when it is marked down",
            engine_up.clone(),
        );
        let engine_requests = Family::<EngineLabels, Counter>::default();
        registry.register(
            "engine_requests",
            "Content requests sent to remote engines (blob and manifest fetches), by engine",
            engine_requests.clone(),
        );
        let repl_jobs = Family::<EngineLabels, Gauge>::default();
        registry.register(
            "replication_jobs_queued",
            "Replication jobs waiting, by target engine",
            repl_jobs.clone(),
        );
        let repl_oldest = Family::<EngineLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "replication_oldest_job_age_seconds",
            "Age of the oldest waiting replication job, by target engine",
            repl_oldest.clone(),
        );
        let repl_bytes = Family::<EngineLabels, Counter>::default();
        registry.register(
            "replication_bytes",
            "Bytes copied to replication targets, by target engine",
            repl_bytes.clone(),
        );
        let repl_done = Family::<EngineLabels, Counter>::default();
        registry.register(
            "replication_jobs_done",
            "Replication jobs completed, by target engine",
            repl_done.clone(),
        );
        let repl_failures = Family::<EngineLabels, Counter>::default();
        registry.register(
            "replication_failures",
            "Failed replication attempts (retried), by target engine",
            repl_failures.clone(),
        );
        let repl_dead = Family::<EngineLabels, Counter>::default();
        registry.register(
            "replication_dead_letters",
            "Replication jobs that can never succeed, moved to the dead-letter prefix, by target engine",
            repl_dead.clone(),
        );
        let pushes = Family::<CacheLabels, Counter>::default();
        registry.register(
            "pushes",
            "Pushed items by kind (blob, manifest, tag) and result",
            pushes.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register(
            "local_engine_bytes",
            "Bytes of content in the local engine (eviction index)",
            cache_bytes.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "local_engine_index_entries",
            "Blobs and manifests in the eviction index",
            cache_entries.clone(),
        );
        let evicted_bytes = Counter::default();
        registry.register(
            "evicted_bytes",
            "Bytes deleted from the local engine by eviction",
            evicted_bytes.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "evictions",
            "Blobs and manifests deleted by eviction",
            evictions.clone(),
        );
        // Alert rules cannot tell the local engine from the others in `engine_up`: this one
        // says "can this region serve from its own storage" without a join on config.
        let local_engine_up = Family::<EngineLabels, Gauge>::default();
        registry.register(
            "local_engine_up",
            "1 when the local engine's probes succeed, 0 when it is marked down (labelled with its id)",
            local_engine_up.clone(),
        );
        let cluster_peer_fills = Counter::default();
        registry.register(
            "cluster_peer_fills",
            "Fills (or resumed fills) streamed from another process of the region holding the digest's fill lease, instead of an upstream",
            cluster_peer_fills.clone(),
        );
        let cluster_takeovers = Counter::default();
        registry.register(
            "cluster_leases_taken_over",
            "Fill leases of another process taken over because it stopped refreshing them",
            cluster_takeovers.clone(),
        );
        let cluster_peer_bytes = Counter::default();
        registry.register(
            "cluster_peer_bytes",
            "Blob bytes received from other processes of the region",
            cluster_peer_bytes.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                cluster_peer_fills,
                cluster_takeovers,
                cluster_peer_bytes,
                cache_bytes,
                cache_entries,
                evicted_bytes,
                evictions,
                prewarm_running,
                prewarm_blobs,
                prewarm_bytes,
                quotas: Default::default(),
                local_engine_up,
                local_engine: OnceLock::new(),
                repl_jobs,
                repl_oldest,
                repl_bytes,
                repl_done,
                repl_failures,
                repl_dead,
                pushes,
                engine_rtt,
                engine_up,
                engine_requests,
                registry,
                requests,
                duration,
                bytes_served,
                cache,
                fills_in_flight,
                fills,
                fills_joined,
                upstream_errors,
                upstream_requests,
                ratelimit_limit,
                ratelimit_remaining,
                breaker_state,
                breaker_openings,
                engine_bytes,
                digest_mismatches,
                range_fetch_bytes,
                range_broken,
                fill_lent_bytes,
                stale_tags,
            }),
        }
    }

    pub fn request(&self, route: &'static str, method: &'static str, status: u16, seconds: f64) {
        let labels = RequestLabels {
            route,
            method,
            status,
        };
        HOT.with(|hot| {
            let make = |l: &RequestLabels| {
                let duration = &self.inner.duration;
                let histogram = duration.get_or_create(&RouteLabels { route: l.route });
                (
                    self.inner.requests.get_or_create(l).clone(),
                    histogram.clone(),
                )
            };
            let record = |(c, h): &(Counter, Histogram)| {
                c.inc();
                h.observe(seconds);
            };
            with_handle(
                &mut hot.borrow_mut().requests,
                self.inner.id,
                labels,
                make,
                record,
            );
        });
    }

    pub fn bytes_served(&self, source: &Arc<str>, n: u64) {
        self.inner
            .bytes_served
            .get_or_create(&SourceLabels {
                source: source.clone(),
            })
            .inc_by(n);
    }

    pub fn cache(&self, kind: &'static str, result: &'static str) {
        let labels = CacheLabels { kind, result };
        HOT.with(|hot| {
            let make = |l: &CacheLabels| self.inner.cache.get_or_create(l).clone();
            with_handle(
                &mut hot.borrow_mut().cache,
                self.inner.id,
                labels,
                make,
                |c| {
                    c.inc();
                },
            );
        });
    }

    pub fn fill_started(&self) {
        self.inner.fills_in_flight.inc();
    }

    pub fn fill_joined(&self) {
        self.inner.fills_joined.inc();
    }

    pub fn fill_finished(&self, result: FillResult) {
        self.inner.fills_in_flight.dec();
        let result = match result {
            FillResult::Done => "done",
            FillResult::NotFound => "not_found",
            FillResult::Failed => "failed",
        };
        self.inner
            .fills
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// A request to `upstream`; `kind` is `pull`, `head` or `other`.
    pub fn upstream_request(&self, upstream: &str, kind: &'static str) {
        self.inner
            .upstream_requests
            .get_or_create(&UpstreamRequestLabels {
                upstream: upstream.into(),
                kind,
            })
            .inc();
    }

    /// The quota `upstream` announced on its last answer to a request made as `credential`.
    pub fn upstream_quota(&self, upstream: &str, credential: &str, limit: u64, remaining: u64) {
        let l = QuotaLabels {
            upstream: upstream.into(),
            credential: credential.into(),
        };
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Ok(mut q) = self.inner.quotas.lock() {
            q.insert(
                (l.upstream.clone(), l.credential.clone()),
                (limit, remaining),
            );
        }
        self.inner.ratelimit_limit.get_or_create(&l).set(g(limit));
        self.inner
            .ratelimit_remaining
            .get_or_create(&l)
            .set(g(remaining));
    }

    /// The last quota each upstream announced: (upstream, credential, limit, remaining).
    pub fn upstream_quotas(&self) -> Vec<(Arc<str>, Arc<str>, u64, u64)> {
        self.inner
            .quotas
            .lock()
            .map(|q| {
                q.iter()
                    .map(|((u, c), (l, r))| (u.clone(), c.clone(), *l, *r))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// An upstream's circuit breaker is now `state` (0 closed, 1 open, 2 half-open).
    pub fn breaker_state(&self, upstream: &str, state: i64) {
        self.inner
            .breaker_state
            .get_or_create(&UpstreamLabels {
                upstream: upstream.into(),
            })
            .set(state);
    }

    /// An upstream's circuit breaker opened.
    pub fn breaker_opened(&self, upstream: &str) {
        self.inner
            .breaker_openings
            .get_or_create(&UpstreamLabels {
                upstream: upstream.into(),
            })
            .inc();
    }

    /// The series of each upstream known at start, at 0, with the credential its requests use
    /// (`anonymous` or the configured user). A quota of 0 of 0 reads "none announced" (the
    /// alert on it divides 0 by 0, which never fires).
    pub fn preset_upstreams(&self, upstreams: &[(String, String)]) {
        for (u, credential) in upstreams {
            let q = QuotaLabels {
                upstream: u.as_str().into(),
                credential: credential.as_str().into(),
            };
            let _ = self.inner.ratelimit_limit.get_or_create(&q);
            let _ = self.inner.ratelimit_remaining.get_or_create(&q);
            let l = UpstreamLabels {
                upstream: u.as_str().into(),
            };
            let _ = self.inner.breaker_state.get_or_create(&l);
            let _ = self.inner.breaker_openings.get_or_create(&l);
            for kind in ["pull", "head", "other"] {
                let _ = self
                    .inner
                    .upstream_requests
                    .get_or_create(&UpstreamRequestLabels {
                        upstream: u.as_str().into(),
                        kind,
                    });
            }
        }
    }

    pub fn upstream_error(&self, engine: &str) {
        self.inner
            .upstream_errors
            .get_or_create(&EngineLabels {
                engine: engine.into(),
            })
            .inc();
    }

    pub fn engine_bytes(&self, engine: &str, n: u64) {
        self.inner
            .engine_bytes
            .get_or_create(&EngineLabels {
                engine: engine.into(),
            })
            .inc_by(n);
    }

    /// Bytes a ranged read of a cold blob fetched from `engine`.
    pub fn range_fetch_bytes(&self, engine: &str, n: u64) {
        self.inner
            .range_fetch_bytes
            .get_or_create(&EngineLabels {
                engine: engine.into(),
            })
            .inc_by(n);
    }

    /// Bytes a fill took lent from ranged reads.
    pub fn fill_lent_bytes(&self, n: u64) {
        self.inner.fill_lent_bytes.inc_by(n);
    }

    /// A ranged response broken because its blob's fill found a digest mismatch.
    pub fn range_broken(&self) {
        self.inner.range_broken.inc();
    }

    pub fn digest_mismatch(&self, engine: &str) {
        self.inner
            .digest_mismatches
            .get_or_create(&EngineLabels {
                engine: engine.into(),
            })
            .inc();
    }

    pub fn engine_health(&self, engine: &str, rtt: Option<f64>, up: bool) {
        let l = EngineLabels {
            engine: engine.into(),
        };
        if let Some(r) = rtt {
            self.inner.engine_rtt.get_or_create(&l).set(r);
        }
        self.inner.engine_up.get_or_create(&l).set(i64::from(up));
        if self
            .inner
            .local_engine
            .get()
            .is_some_and(|id| **id == *engine)
        {
            self.inner
                .local_engine_up
                .get_or_create(&l)
                .set(i64::from(up));
        }
    }

    /// Names the local engine (once; later calls are ignored). Its series starts at 0 (down)
    /// until the first probe says otherwise, so a region that never reached its storage is
    /// never reported healthy.
    pub fn set_local_engine(&self, id: &str) {
        if self.inner.local_engine.set(Arc::from(id)).is_ok() {
            self.inner
                .local_engine_up
                .get_or_create(&EngineLabels { engine: id.into() })
                .set(0);
        }
    }

    pub fn engine_request(&self, engine: &str) {
        self.inner
            .engine_requests
            .get_or_create(&EngineLabels {
                engine: engine.into(),
            })
            .inc();
    }

    pub fn replication_backlog(&self, target: &str, jobs: usize, oldest_seconds: f64) {
        let l = EngineLabels {
            engine: target.into(),
        };
        self.inner
            .repl_jobs
            .get_or_create(&l)
            .set(i64::try_from(jobs).unwrap_or(i64::MAX));
        self.inner.repl_oldest.get_or_create(&l).set(oldest_seconds);
    }

    pub fn replicated(&self, target: &str, bytes: u64) {
        let l = EngineLabels {
            engine: target.into(),
        };
        self.inner.repl_bytes.get_or_create(&l).inc_by(bytes);
        self.inner.repl_done.get_or_create(&l).inc();
    }

    pub fn replication_failure(&self, target: &str) {
        self.inner
            .repl_failures
            .get_or_create(&EngineLabels {
                engine: target.into(),
            })
            .inc();
    }

    pub fn replication_dead_letter(&self, target: &str) {
        self.inner
            .repl_dead
            .get_or_create(&EngineLabels {
                engine: target.into(),
            })
            .inc();
    }

    /// Makes the series whose labels are known from the config, at 0, so the first scrape has
    /// every family (a dashboard shows zeros, not "No data", and `rate()` sees the first
    /// increments): the label-free families, `local` and each engine as a source, each remote
    /// engine (`remotes`: storage engines and upstreams), the usual lookup and push outcomes,
    /// and the request series of the pull routes.
    pub fn preset(&self, remotes: &[String]) {
        let i = &self.inner;
        for route in ["blob", "manifest_tag", "manifest_digest"] {
            let _ = i.duration.get_or_create(&RouteLabels { route });
            for status in [200, 502] {
                let _ = i.requests.get_or_create(&RequestLabels {
                    route,
                    method: "GET",
                    status,
                });
            }
        }
        for kind in ["blob", "manifest", "tag"] {
            for result in ["hit", "miss"] {
                let _ = i.cache.get_or_create(&CacheLabels { kind, result });
            }
        }
        for result in ["revalidated", "stale"] {
            let _ = i.cache.get_or_create(&CacheLabels {
                kind: "tag",
                result,
            });
        }
        let _ = i.cache.get_or_create(&CacheLabels {
            kind: "manifest",
            result: "negative",
        });
        for result in ["done", "not_found", "failed"] {
            let _ = i.fills.get_or_create(&ResultLabels { result });
        }
        for (kind, result) in [("blob", "ok"), ("blob", "mounted"), ("manifest", "ok")] {
            let _ = i.pushes.get_or_create(&CacheLabels { kind, result });
        }
        let _ = i.bytes_served.get_or_create(&SourceLabels {
            source: Arc::from(LOCAL),
        });
        for id in remotes {
            let l = EngineLabels {
                engine: id.as_str().into(),
            };
            let _ = i.bytes_served.get_or_create(&SourceLabels {
                source: l.engine.clone(),
            });
            let _ = i.upstream_errors.get_or_create(&l);
            let _ = i.engine_bytes.get_or_create(&l);
            let _ = i.range_fetch_bytes.get_or_create(&l);
            let _ = i.digest_mismatches.get_or_create(&l);
            let _ = i.engine_requests.get_or_create(&l);
            let _ = i.engine_up.get_or_create(&l);
            let _ = i.engine_rtt.get_or_create(&l);
        }
    }

    /// The replication series of each target, at 0 (see [`Metrics::preset`]).
    pub fn preset_replication(&self, targets: &[String]) {
        let i = &self.inner;
        for t in targets {
            let l = EngineLabels {
                engine: t.as_str().into(),
            };
            let _ = i.repl_jobs.get_or_create(&l);
            let _ = i.repl_oldest.get_or_create(&l);
            let _ = i.repl_bytes.get_or_create(&l);
            let _ = i.repl_done.get_or_create(&l);
            let _ = i.repl_failures.get_or_create(&l);
            let _ = i.repl_dead.get_or_create(&l);
        }
    }

    pub fn push(&self, kind: &'static str, result: &'static str) {
        self.inner
            .pushes
            .get_or_create(&CacheLabels { kind, result })
            .inc();
    }

    pub fn cache_usage(&self, bytes: u64, entries: usize) {
        self.inner
            .cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.inner
            .cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    pub fn evicted(&self, bytes: u64) {
        self.inner.evicted_bytes.inc_by(bytes);
        self.inner.evictions.inc();
    }

    /// Prewarm jobs running now.
    pub fn prewarm_running(&self, n: usize) {
        self.inner
            .prewarm_running
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The prewarm series of each storage engine, at 0 (see [`Metrics::preset`]): a job can
    /// bring blobs into any of them.
    pub fn preset_prewarm(&self, engines: &[String]) {
        for e in engines {
            let l = EngineLabels {
                engine: e.as_str().into(),
            };
            let _ = self.inner.prewarm_blobs.get_or_create(&l);
            let _ = self.inner.prewarm_bytes.get_or_create(&l);
        }
    }

    /// A blob a prewarm job made present in `engine`: `moved` when it was transferred (`bytes`).
    pub fn prewarmed(&self, engine: &str, moved: bool, bytes: u64) {
        if !moved {
            return;
        }
        let l = EngineLabels {
            engine: engine.into(),
        };
        self.inner.prewarm_blobs.get_or_create(&l).inc();
        self.inner.prewarm_bytes.get_or_create(&l).inc_by(bytes);
    }

    pub fn cluster_peer_fill(&self) {
        self.inner.cluster_peer_fills.inc();
    }

    pub fn cluster_lease_taken_over(&self) {
        self.inner.cluster_takeovers.inc();
    }

    pub fn cluster_peer_bytes(&self, n: u64) {
        self.inner.cluster_peer_bytes.inc_by(n);
    }

    /// (fills joined from a peer, leases taken over, bytes received from peers).
    pub fn cluster_counts(&self) -> (u64, u64, u64) {
        (
            self.inner.cluster_peer_fills.get(),
            self.inner.cluster_takeovers.get(),
            self.inner.cluster_peer_bytes.get(),
        )
    }

    pub fn stale_tag(&self) {
        self.inner.stale_tags.inc();
    }

    /// Lookups so far of `kind` with `result` (read back for the in-memory history).
    pub fn cache_count(&self, kind: &'static str, result: &'static str) -> u64 {
        self.inner
            .cache
            .get(&CacheLabels { kind, result })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Body bytes served so far from `source` (`local` or an engine id).
    pub fn bytes_served_total(&self, source: &str) -> u64 {
        self.inner
            .bytes_served
            .get(&SourceLabels {
                source: source.into(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Bytes fetched so far from remote engine `engine`.
    pub fn engine_bytes_total(&self, engine: &str) -> u64 {
        self.inner
            .engine_bytes
            .get(&EngineLabels {
                engine: engine.into(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.inner.registry).is_err() {
            out.clear();
        }
        out
    }
}
