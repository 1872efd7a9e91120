//! Wiring: builds the engines, the pull path and the metrics from a `Config`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::config::Config;
use crate::engine::caching::{CachingEngine, Freshness, Generation};
use crate::engine::nearness::{Nearness, ProbeSettings};
use crate::engine::registry::auth::RealmPolicy;
use crate::engine::registry::health::{Health, Settings};
use crate::engine::registry::{client, RegistryClient, RegistryEngine};
use crate::engine::set::Engines;
use crate::engine::storage::StorageEngine;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::evict::{Evictor, Limits};
use crate::history::History;
use crate::metrics::Metrics;
use crate::pull::fill::Fills;
use crate::pull::tags::TagCache;
use crate::pull::Puller;
use crate::push::forward::Forwarder;
use crate::push::Pusher;
use crate::replicate::copy::Copier;
use crate::replicate::queue::Queue;
use crate::replicate::Replicator;

/// Everything a request needs.
pub struct App {
    pub config: Config,
    /// The push path, when `push.engine` names a storage engine.
    pub pusher: Option<Arc<Pusher>>,
    /// Pushes forwarded to an upstream registry, when `push.engine` names one.
    pub forwarder: Option<Forwarder>,
    /// Keeps the local engine under `cache.max_size`, when set.
    pub evictor: Option<Arc<Evictor>>,
    /// This process in its region, with `cluster:`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Access control, when the config has an `auth:` section.
    pub auth: Option<Arc<crate::auth::Auth>>,
    pub region: HeaderValue,
    pub puller: Arc<Puller>,
    /// Prewarm jobs (`POST /_ociedge/prewarm`, `ociedge prewarm`).
    pub prewarmer: Arc<crate::prewarm::Prewarmer>,
    pub metrics: Metrics,
    /// The last hour of hits, misses and bytes by source, for the status page.
    pub history: Arc<History>,
    /// The labels `history` reads: bytes are served from these sources…
    pub history_sources: Vec<String>,
    /// …and fetched from these remote engines.
    pub history_engines: Vec<String>,
    /// `Cache-Control` of answers by tag (`public, max-age=<tag_ttl>`), made once.
    pub tag_cache_control: http::HeaderValue,
}

/// Spool files older than this are leftovers of a crashed process (a fill never takes a day).
const STALE_SPOOL: Duration = Duration::from_secs(24 * 3600);

impl App {
    /// Builds the app, probes every engine once (so the first misses are already ranked), and
    /// starts the background prober.
    pub async fn build(config: Config) -> Result<Arc<App>> {
        let metrics = Metrics::new();
        let pref = config.storage.preference.clone();
        // Every engine is wrapped once in a caching engine, and every path of this process
        // reads and writes through that wrapper (see `engine::caching`).
        let generation = Generation::default();
        let tag_ttl = config.cache.tag_ttl.0;
        let cached = |e: Arc<dyn Engine>, f: Freshness| {
            Arc::new(CachingEngine::new(e, generation.clone(), f))
        };
        let mut cached_by_id: std::collections::HashMap<String, Arc<CachingEngine>> =
            Default::default();
        let mut local_cached: Option<Arc<CachingEngine>> = None;
        let mut local: Option<Arc<StorageEngine>> = None;
        let mut by_id: std::collections::HashMap<String, Arc<StorageEngine>> = Default::default();
        let mut remotes: Vec<Arc<dyn Engine>> = Vec::new();
        let mut probed: Vec<(Arc<dyn Engine>, i32)> = Vec::new();
        for (id, ec) in &config.storage.engines {
            let engine = Arc::new(StorageEngine::open(id, &ec.url, &ec.options)?);
            let is_local = *id == pref;
            let freshness = if is_local {
                Freshness::local(tag_ttl)
            } else {
                Freshness::remote(tag_ttl)
            };
            let wrapped = cached(engine.clone(), freshness);
            probed.push((wrapped.clone(), ec.priority.unwrap_or(0)));
            by_id.insert(id.clone(), engine.clone());
            cached_by_id.insert(id.clone(), wrapped.clone());
            if is_local {
                local = Some(engine);
                local_cached = Some(wrapped);
            } else {
                remotes.push(wrapped);
            }
        }
        let local = local.ok_or_else(|| {
            Error::Config(format!(
                "storage.preference: {pref:?} is not a configured engine"
            ))
        })?;
        let http = client::http_client()?;
        let mut upstreams: Vec<(String, Arc<dyn Engine>)> = Vec::new();
        let mut health = Vec::new();
        for u in &config.upstreams {
            let base = url::Url::parse(&u.url)
                .map_err(|e| Error::Config(format!("upstreams: {}: {e}", u.name)))?;
            let basic = u
                .auth
                .as_ref()
                .and_then(|a| a.resolve_password().map(|p| (a.username.clone(), p)));
            let http = match &u.ca_file {
                Some(ca) => client::http_client_with_ca(ca)
                    .map_err(|e| Error::Config(format!("upstreams: {}: ca_file: {e}", u.name)))?,
                None => http.clone(),
            };
            let h = Arc::new(Health::new(&u.name, Settings::of(u)).with_metrics(metrics.clone()));
            health.push((u.name.clone(), h.clone()));
            let mut client = RegistryClient::new(&u.name, base, http, basic)
                .with_metrics(metrics.clone())
                .with_health(h);
            if let Some(realms) = RealmPolicy::of(u) {
                client = client.with_realms(realms);
            }
            let freshness = Freshness::upstream(tag_ttl, config.cache.negative_ttl.0);
            let engine: Arc<dyn Engine> = Arc::new(
                CachingEngine::new(
                    Arc::new(RegistryEngine::new(client)),
                    generation.clone(),
                    freshness,
                )
                .with_metrics(metrics.clone()),
            );
            probed.push((engine.clone(), 0));
            upstreams.push((u.name.clone(), engine));
        }
        let spool_dir = match local.local_root() {
            // Same filesystem as the blobs: a verified spool file is hard-linked into place.
            Some(root) => root.join("_ociedge").join("spool"),
            None => std::env::temp_dir().join("ociedge-spool"),
        };
        std::fs::create_dir_all(&spool_dir).map_err(|e| {
            Error::Config(format!(
                "cannot create spool directory {}: {e}",
                spool_dir.display()
            ))
        })?;
        clean_spool(&spool_dir);
        let local_storage = local.clone();
        let local_cached =
            local_cached.ok_or_else(|| Error::Config("storage.preference".into()))?;
        let local_dyn: Arc<dyn Engine> = local_cached.clone();
        let p = &config.storage.probe;
        let settings = ProbeSettings {
            interval: p.interval.0,
            timeout: p.timeout.0,
            down_after: p.down_after,
        };
        metrics.set_local_engine(local_dyn.id());
        let remote_ids: Vec<String> = probed
            .iter()
            .map(|(e, _)| e.id().to_string())
            .filter(|id| *id != pref)
            .collect();
        metrics.preset(&remote_ids);
        metrics.preset_prewarm(&config.storage.engines.keys().cloned().collect::<Vec<_>>());
        metrics.preset_upstreams(
            &config
                .upstreams
                .iter()
                .map(|u| {
                    let credential = match &u.auth {
                        Some(a) => a.username.clone(),
                        None => crate::engine::registry::health::ANONYMOUS.to_string(),
                    };
                    (u.name.clone(), credential)
                })
                .collect::<Vec<_>>(),
        );
        // Every label bytes can be counted under: `local` for hits, an engine id otherwise.
        let history_engines: Vec<String> = probed
            .iter()
            .map(|(e, _)| e.id().to_string())
            .filter(|id| *id != pref)
            .collect();
        let history_sources: Vec<String> = std::iter::once(crate::pull::LOCAL.to_string())
            .chain(probed.iter().map(|(e, _)| e.id().to_string()))
            .collect();
        let nearness = Arc::new(Nearness::new(probed, settings, metrics.clone()));
        nearness.probe_all().await;
        tokio::spawn(nearness.clone().run());
        let engines =
            Arc::new(Engines::new(local_dyn, remotes, upstreams, nearness).with_health(&health));
        let fills = Fills::new(spool_dir.clone(), metrics.clone());
        let tags = TagCache::new(config.cache.tag_ttl.0, config.cache.max_stale.0);
        let mut puller = Puller::new(engines, local_cached, fills, tags, metrics.clone());
        puller.set_fill_on_range(config.cache.fill_on_range);
        let evictor = config.cache.max_size.map(|m| {
            let push_engine = config.push.engine.as_deref();
            let limits = Limits {
                max_size: Some(m.0),
                low_water: config.cache.low_water,
                min_idle: config.cache.min_idle.0,
                stale_uploads: config.cache.stale_uploads.0,
                // Pushed elsewhere and replicated here: every local copy exists elsewhere.
                all_cached: push_engine
                    .is_some_and(|p| p != pref && !config.upstreams.iter().any(|u| u.name == p)),
            };
            Arc::new(Evictor::new(local_storage.clone(), limits, metrics.clone()))
        });
        if let Some(ev) = &evictor {
            puller.set_evictor(ev.clone());
            let fills = puller.fills().clone();
            ev.set_filling(Box::new(move || {
                fills.snapshot().into_iter().map(|(d, _)| d).collect()
            }));
        }
        let cluster = match &config.cluster {
            Some(c) => {
                let advertise = c
                    .advertise_url(config.listen, config.tls.is_some())
                    .map_err(|e| Error::Config(e.0))?;
                let secret = c.secret().map_err(|e| Error::Config(e.0))?;
                let cl = Arc::new(crate::cluster::Cluster::new(
                    local_storage.store().clone(),
                    &advertise,
                    secret,
                    metrics.clone(),
                )?);
                cl.probe().await;
                puller.set_cluster(cl.clone());
                if let Some(ev) = &evictor {
                    ev.set_cluster(cl.clone());
                }
                cl.spawn_presence(evictor.is_none());
                Some(cl)
            }
            None => None,
        };
        if let Some(d) = config.storage.redirect_blobs {
            puller.set_redirect(d.0);
        }
        let forwarder = match &config.push.engine {
            Some(id) => match config.upstreams.iter().find(|u| &u.name == id) {
                Some(u) => {
                    let base = url::Url::parse(&u.url)
                        .map_err(|e| Error::Config(format!("upstreams: {}: {e}", u.name)))?;
                    Some(
                        Forwarder::new(&u.name, base, http.clone())
                            .with_generation(generation.clone()),
                    )
                }
                None => None,
            },
            None => None,
        };
        let pusher = match &config.push.engine {
            Some(id) if forwarder.is_none() => {
                let engine = by_id.get(id).cloned().ok_or_else(|| {
                    Error::Config(format!("push.engine: {id:?} is not a storage engine"))
                })?;
                let defaults: Vec<String> = config
                    .storage
                    .engines
                    .iter()
                    .filter(|(tid, ec)| *tid != id && ec.replicate_by_default)
                    .map(|(tid, _)| tid.clone())
                    .collect();
                let rules: Vec<(String, Vec<String>)> = config
                    .push
                    .replicate
                    .iter()
                    .map(|r| (r.repos.clone(), r.to.clone()))
                    .collect();
                let mut all: Vec<String> = defaults
                    .iter()
                    .chain(rules.iter().flat_map(|(_, t)| t))
                    .cloned()
                    .collect();
                all.sort();
                all.dedup();
                let targets: Vec<(String, Arc<dyn Engine>)> = all
                    .iter()
                    .filter_map(|tid| {
                        cached_by_id
                            .get(tid)
                            .map(|e| (tid.clone(), e.clone() as Arc<dyn Engine>))
                    })
                    .collect();
                let copier = Copier {
                    spool_dir: spool_dir.clone(),
                };
                let source: Arc<dyn Engine> = match cached_by_id.get(id) {
                    Some(c) => c.clone(),
                    None => engine.clone(),
                };
                metrics.preset_replication(&all);
                let replicator = Arc::new(Replicator::new(
                    Queue::new(engine.clone()).with_metrics(metrics.clone()),
                    source.clone(),
                    targets,
                    defaults,
                    rules,
                    copier,
                    metrics.clone(),
                ));
                tokio::spawn(replicator.clone().run());
                let pushed = Arc::new(crate::engine::pushed::PushedRepos::new(
                    id,
                    engine.store().clone(),
                    config.cache.tag_ttl.0,
                ));
                puller.set_preferred(source.clone(), pushed.clone());
                let mut pusher = Pusher::new(
                    engine,
                    source,
                    pushed,
                    spool_dir.clone(),
                    replicator.clone(),
                    metrics.clone(),
                );
                // Stale sessions go whatever the cache settings.
                pusher.clean_uploads_after(config.cache.stale_uploads.0);
                if config.auth.is_none() {
                    pusher.link_stored_blobs();
                }
                if *id == pref {
                    if let Some(ev) = &evictor {
                        pusher.set_evictor(ev.clone());
                        ev.set_replicator(replicator);
                    }
                }
                Some(Arc::new(pusher))
            }
            _ => None,
        };
        // Prewarm jobs are kept where replication jobs are: the preferred engine when it is a
        // storage engine, else the local one.
        let jobs_engine = config
            .push
            .engine
            .as_ref()
            .and_then(|id| by_id.get(id).cloned())
            .unwrap_or_else(|| local_storage.clone());
        let puller = Arc::new(puller);
        let prewarmer = Arc::new(crate::prewarm::Prewarmer::new(
            puller.clone(),
            Copier {
                spool_dir: spool_dir.clone(),
            },
            crate::prewarm::store::Store::new(jobs_engine),
            local_storage.clone(),
            metrics.clone(),
        ));
        let history = Arc::new(History::default());
        tokio::spawn(crate::history::run(
            history.clone(),
            metrics.clone(),
            history_sources.clone(),
            history_engines.clone(),
        ));
        if config
            .auth
            .as_ref()
            .is_some_and(|a| a.token.realm.is_none())
        {
            tracing::info!("auth.token.realm is not set: clients are sent to /token at the address of the listener they reached; set it to the name clients use (behind a proxy, or for TLS clients that check the certificate's name)");
        }
        let auth = match &config.auth {
            Some(a) => Some(Arc::new(
                crate::auth::Auth::new(a, &config.upstreams, http.clone())
                    .map_err(Error::Config)?,
            )),
            None => None,
        };
        let region = HeaderValue::from_str(&config.region)
            .map_err(|_| Error::Config("region: not a valid header value".into()))?;
        if let Some(ev) = &evictor {
            tokio::spawn(ev.clone().run(spool_dir.clone()));
        }
        Ok(Arc::new(App {
            pusher,
            forwarder,
            evictor,
            cluster,
            auth,
            tag_cache_control: http::HeaderValue::from_str(&format!(
                "public, max-age={}",
                config.cache.tag_ttl.0.as_secs()
            ))
            .unwrap_or_else(|_| http::HeaderValue::from_static("no-cache")),
            config,
            region,
            puller,
            prewarmer,
            metrics,
            history,
            history_sources,
            history_engines,
        }))
    }
}

/// Removes spool files left by a process that died mid-fill.
fn clean_spool(dir: &PathBuf) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > STALE_SPOOL);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
