//! `Engines`: the local engine, the remote storage engines and the upstream registries, and the
//! routing of a requested repository name to the upstream that owns it.

use std::sync::Arc;

use super::nearness::Nearness;
use super::Engine;
use crate::error::{Error, Result};
use crate::oci::name::{is_registry_host, registry_prefix};
use crate::oci::{ErrorCode, RepoName};

/// An upstream registry engine with the name clients use for it.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub engine: Arc<dyn Engine>,
    /// Docker Hub: one-component names mean `library/<name>`.
    pub docker_hub: bool,
    /// Its back-off, circuit breaker and quota, when it is a registry engine.
    pub health: Option<Arc<super::registry::health::Health>>,
}

impl Upstream {
    /// Whether its remaining pull quota is under `ratelimit_reserve`
    /// ([`super::registry::health::Health::quota_low`]).
    pub fn quota_low(&self) -> bool {
        self.health.as_ref().is_some_and(|h| h.quota_low())
    }
}

/// Where a requested name goes.
#[derive(Debug, Clone)]
pub struct Routed {
    /// Index into [`Engines::upstreams`], if an upstream owns the name.
    pub upstream: Option<usize>,
    /// The name as the upstream knows it (`library/alpine`).
    pub upstream_repo: RepoName,
    /// The name in storage engines: the upstream name for the default upstream, else
    /// `<registry>/<name>` so two registries' `org/app` never collide.
    pub storage_repo: RepoName,
}

#[derive(Debug)]
pub struct Engines {
    local: Arc<dyn Engine>,
    storage_remotes: Vec<Arc<dyn Engine>>,
    upstreams: Vec<Upstream>,
    nearness: Arc<Nearness>,
}

fn is_docker_hub(name: &str) -> bool {
    matches!(
        name,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

impl Engines {
    pub fn new(
        local: Arc<dyn Engine>,
        storage_remotes: Vec<Arc<dyn Engine>>,
        upstreams: Vec<(String, Arc<dyn Engine>)>,
        nearness: Arc<Nearness>,
    ) -> Engines {
        let upstreams = upstreams
            .into_iter()
            .map(|(name, engine)| Upstream {
                docker_hub: is_docker_hub(&name),
                name,
                engine,
                health: None,
            })
            .collect();
        Engines {
            local,
            storage_remotes,
            upstreams,
            nearness,
        }
    }

    /// Engines for routing alone (tests and the `storage_names` fuzz target): in-memory
    /// engines, one upstream per name, the first the default.
    #[doc(hidden)]
    pub fn for_routing(names: &[&str]) -> Engines {
        let mem = || -> Arc<dyn Engine> {
            Arc::new(super::storage::StorageEngine::from_store(
                "m",
                Arc::new(object_store::memory::InMemory::new()),
            ))
        };
        let settings = super::nearness::ProbeSettings {
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(1),
            down_after: 1,
        };
        let near = Arc::new(Nearness::new(
            vec![],
            settings,
            crate::metrics::Metrics::new(),
        ));
        Engines::new(
            mem(),
            vec![],
            names.iter().map(|n| (n.to_string(), mem())).collect(),
            near,
        )
    }

    pub fn nearness(&self) -> &Arc<Nearness> {
        &self.nearness
    }

    /// Whether the local engine's probes succeed. When it is down, requests skip it (no lookups
    /// that would wait on a dead store, no fills) and are served from remote engines.
    pub fn local_usable(&self) -> bool {
        self.nearness.is_up(self.local.id())
    }

    /// Every storage engine, the local one first.
    pub fn storage(&self) -> impl Iterator<Item = &Arc<dyn Engine>> {
        std::iter::once(&self.local).chain(self.storage_remotes.iter())
    }

    pub fn local(&self) -> &Arc<dyn Engine> {
        &self.local
    }

    /// Gives each upstream named in `health` its health (see [`Upstream::health`]).
    pub fn with_health(
        mut self,
        health: &[(String, Arc<super::registry::health::Health>)],
    ) -> Engines {
        for u in &mut self.upstreams {
            u.health = health
                .iter()
                .find(|(n, _)| *n == u.name)
                .map(|(_, h)| h.clone());
        }
        self
    }

    /// Whether upstream `name`'s remaining pull quota is under its `ratelimit_reserve` (what
    /// background work such as prewarming pauses on). `false` for an unknown name.
    pub fn quota_low(&self, name: &str) -> bool {
        self.upstreams
            .iter()
            .any(|u| u.name == name && u.quota_low())
    }

    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    pub fn upstream(&self, routed: &Routed) -> Option<&Upstream> {
        routed.upstream.and_then(|i| self.upstreams.get(i))
    }

    /// Every engine but the local one, nearest first: the remote storage engines and the upstream
    /// registry that owns the name, in one ranking.
    pub fn remotes_for(&self, routed: &Routed) -> Vec<(Arc<dyn Engine>, RepoName)> {
        let mut out: Vec<(Arc<dyn Engine>, RepoName)> = self
            .storage_remotes
            .iter()
            .map(|e| (e.clone(), routed.storage_repo.clone()))
            .collect();
        if let Some(u) = self.upstream(routed) {
            out.push((u.engine.clone(), routed.upstream_repo.clone()));
        }
        self.nearness.rank(&mut out, |(e, _)| e.id());
        out
    }

    /// Routes a requested name: containerd's `?ns=registry`, then a leading path component that
    /// names a configured upstream (`ghcr.io/org/app`), then the default (first) upstream.
    ///
    /// The map (upstream, repository) → storage name is injective: the default upstream's
    /// content is stored under its plain name and every other upstream's under
    /// `<registry prefix>/<name>`, so a default-upstream name may not start with a component
    /// that could be such a prefix: a registry host in the Docker reference grammar
    /// (`ghcr.io/…`, `localhost/…`, `host:5000/…`: never a Docker Hub name) or another
    /// upstream's prefix. Those answer `NAME_UNKNOWN` (without `?ns=` or a prefix they already
    /// went to the upstream they name). Every access decision is made on the storage name, so
    /// it is made on the pair. [`Engines::owner`] is the inverse.
    pub fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Routed> {
        let (idx, repo) = if let Some(ns) = ns.filter(|n| !n.is_empty()) {
            let idx = self.find(ns).ok_or_else(|| {
                Error::client(
                    ErrorCode::NameUnknown,
                    format!("no upstream is configured for registry {ns:?}"),
                )
            })?;
            (Some(idx), name.clone())
        } else if let (Some(idx), Some(rest)) =
            (self.find(name.first_component()), name.strip_first())
        {
            (Some(idx), rest)
        } else if self.upstreams.is_empty() {
            (None, name.clone())
        } else {
            (Some(0), name.clone())
        };
        if idx == Some(0) && !self.plain_default_name(&repo) {
            return Err(Error::client(
                ErrorCode::NameUnknown,
                format!(
                    "{repo:?} names registry {:?}, not a repository of {}",
                    repo.first_component(),
                    self.upstreams[0].name
                ),
            ));
        }
        let upstream_repo = match idx.map(|i| &self.upstreams[i]) {
            Some(u) if u.docker_hub && repo.depth() == 1 => repo
                .with_prefix("library")
                .map_err(|e| Error::client(ErrorCode::NameInvalid, e.to_string()))?,
            _ => repo,
        };
        let storage_repo = match idx {
            Some(i) if i > 0 => upstream_repo
                .with_prefix(&registry_prefix(&self.upstreams[i].name))
                .map_err(|e| Error::client(ErrorCode::NameInvalid, e.to_string()))?,
            _ => upstream_repo.clone(),
        };
        Ok(Routed {
            upstream: idx,
            upstream_repo,
            storage_repo,
        })
    }

    /// Whether the default upstream's `repo` may be stored under its plain name: a one-component
    /// name always; a longer one unless its first component is a registry host or another
    /// upstream's storage prefix.
    fn plain_default_name(&self, repo: &RepoName) -> bool {
        if repo.depth() == 1 {
            return true;
        }
        let first = repo.first_component();
        !is_registry_host(first)
            && !self.upstreams[1..]
                .iter()
                .any(|u| registry_prefix(&u.name) == first)
    }

    /// The (upstream, repository) pair stored under `storage_repo`: the inverse of
    /// [`Engines::route`]. `None` for a storage name no pair maps to.
    pub fn owner(&self, storage_repo: &RepoName) -> Option<(Option<usize>, RepoName)> {
        if self.upstreams.is_empty() {
            return Some((None, storage_repo.clone()));
        }
        if let Some(rest) = storage_repo.strip_first() {
            let first = storage_repo.first_component();
            if let Some(i) = (1..self.upstreams.len())
                .find(|&i| registry_prefix(&self.upstreams[i].name) == first)
            {
                return Some((Some(i), rest));
            }
        }
        self.plain_default_name(storage_repo)
            .then(|| (Some(0), storage_repo.clone()))
    }

    fn find(&self, registry: &str) -> Option<usize> {
        self.upstreams
            .iter()
            .position(|u| u.name == registry || (u.docker_hub && is_docker_hub(registry)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engines(names: &[&str]) -> Engines {
        Engines::for_routing(names)
    }

    fn route(e: &Engines, name: &str, ns: Option<&str>) -> (Option<usize>, String, String) {
        let r = e.route(&name.parse().unwrap(), ns).unwrap();
        (
            r.upstream,
            r.upstream_repo.to_string(),
            r.storage_repo.to_string(),
        )
    }

    #[test]
    fn routing() {
        let e = engines(&["docker.io", "ghcr.io", "upstream.local:5000"]);
        assert_eq!(
            route(&e, "alpine", None),
            (Some(0), "library/alpine".into(), "library/alpine".into())
        );
        assert_eq!(
            route(&e, "alpine", Some("docker.io")),
            (Some(0), "library/alpine".into(), "library/alpine".into())
        );
        assert_eq!(
            route(&e, "docker.io/library/alpine", None),
            (Some(0), "library/alpine".into(), "library/alpine".into())
        );
        assert_eq!(
            route(&e, "ghcr.io/org/app", None),
            (Some(1), "org/app".into(), "ghcr.io/org/app".into())
        );
        assert_eq!(
            route(&e, "org/app", Some("ghcr.io")),
            (Some(1), "org/app".into(), "ghcr.io/org/app".into())
        );
        assert_eq!(
            route(&e, "a/b", Some("upstream.local:5000")),
            (Some(2), "a/b".into(), "upstream.local-5000/a/b".into())
        );
        assert!(e.route(&"a".parse().unwrap(), Some("quay.io")).is_err());
    }

    /// Every spelling (`?ns=`, path prefix, `library/`, case) of every name built from
    /// look-alike components, against several upstream sets: no two (upstream, repository)
    /// pairs share a storage name, and [`Engines::owner`] maps each storage name back to its pair.
    #[test]
    fn no_two_upstream_repositories_share_a_storage_name() {
        let components = [
            "a",
            "library",
            "docker.io",
            "index.docker.io",
            "ghcr.io",
            "ghcr-io",
            "priv.example",
            "localhost",
            "upstream.local-5000",
            "upstream.local",
            "myreg",
            "x.y",
        ];
        let mut names: Vec<String> = Vec::new();
        for a in components {
            names.push(a.to_string());
            for b in components {
                names.push(format!("{a}/{b}"));
                for c in ["a", "library", "ghcr.io"] {
                    names.push(format!("{a}/{b}/{c}"));
                }
            }
        }
        let sets: &[&[&str]] = &[
            &[
                "docker.io",
                "ghcr.io",
                "upstream.local:5000",
                "priv.example",
            ],
            &["registry.corp", "myreg", "localhost:5000", "docker.io"],
            &["myreg", "ghcr.io"],
            &["docker.io"],
            &[],
        ];
        for set in sets {
            let e = engines(set);
            let mut ns: Vec<Option<&str>> = vec![None, Some("index.docker.io"), Some("GHCR.IO")];
            ns.extend(set.iter().map(|n| Some(*n)));
            let mut seen: std::collections::HashMap<String, (Option<usize>, String)> =
                std::collections::HashMap::new();
            for n in &names {
                let Ok(name) = n.parse::<RepoName>() else {
                    continue;
                };
                for q in &ns {
                    let Ok(r) = e.route(&name, *q) else {
                        continue;
                    };
                    let pair = (r.upstream, r.upstream_repo.to_string());
                    if let Some(prev) = seen.insert(r.storage_repo.to_string(), pair.clone()) {
                        assert_eq!(
                            prev, pair,
                            "{set:?}: {n} ns={q:?} shares storage name {} with another pair",
                            r.storage_repo
                        );
                    }
                    assert_eq!(
                        e.owner(&r.storage_repo),
                        Some((r.upstream, r.upstream_repo.clone())),
                        "{set:?}: {n} ns={q:?}"
                    );
                }
            }
            assert!(
                seen.len() > 100,
                "{set:?}: only {} names routed",
                seen.len()
            );
        }
    }

    #[test]
    fn a_registry_host_is_never_a_default_upstream_repository() {
        let e = engines(&["docker.io", "ghcr.io", "priv.example", "myreg"]);
        for (name, ns) in [
            ("priv.example/secret/app", Some("docker.io")),
            ("docker.io/priv.example/secret/app", None),
            ("index.docker.io/ghcr.io/org/app", None),
            ("ghcr.io/org/app", Some("docker.io")),
            ("localhost/app", None),
            ("other.example/app", None),
            ("myreg/app", Some("docker.io")),
        ] {
            let err = e.route(&name.parse().unwrap(), ns).unwrap_err();
            assert!(
                err.to_string().contains("names registry"),
                "{name} {ns:?}: {err}"
            );
        }
        // What each name means stays reachable under its own upstream.
        assert_eq!(
            route(&e, "priv.example/secret/app", None),
            (
                Some(2),
                "secret/app".into(),
                "priv.example/secret/app".into()
            )
        );
        assert_eq!(
            route(&e, "myreg/app", None),
            (Some(3), "app".into(), "myreg/app".into())
        );
        // One-component names are never hosts.
        assert_eq!(
            route(&e, "x.y", None),
            (Some(0), "library/x.y".into(), "library/x.y".into())
        );
    }
}
