//! `Engines`: the local engine, the remote storage engines and the upstream registries, and the
//! routing of a requested repository name to the upstream that owns it.

use std::sync::Arc;

use super::nearness::Nearness;
use super::Engine;
use crate::error::{Error, Result};
use crate::oci::{ErrorCode, RepoName};

/// An upstream registry engine with the name clients use for it.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub engine: Arc<dyn Engine>,
    /// Docker Hub: one-component names mean `library/<name>`.
    pub docker_hub: bool,
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

/// A registry name as a repository component: `upstream.local:5000` → `upstream.local-5000`.
fn storage_prefix(registry: &str) -> String {
    registry
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.' | '-' | '_') => c,
            _ => '-',
        })
        .collect()
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
            })
            .collect();
        Engines {
            local,
            storage_remotes,
            upstreams,
            nearness,
        }
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
        let upstream_repo = match idx.map(|i| &self.upstreams[i]) {
            Some(u) if u.docker_hub && repo.depth() == 1 => repo
                .with_prefix("library")
                .map_err(|e| Error::client(ErrorCode::NameInvalid, e.to_string()))?,
            _ => repo,
        };
        let storage_repo = match idx {
            Some(i) if i > 0 => upstream_repo
                .with_prefix(&storage_prefix(&self.upstreams[i].name))
                .map_err(|e| Error::client(ErrorCode::NameInvalid, e.to_string()))?,
            _ => upstream_repo.clone(),
        };
        Ok(Routed {
            upstream: idx,
            upstream_repo,
            storage_repo,
        })
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
    use crate::engine::storage::StorageEngine;

    fn engines(names: &[&str]) -> Engines {
        let mem = || -> Arc<dyn Engine> {
            Arc::new(StorageEngine::from_store(
                "m",
                Arc::new(object_store::memory::InMemory::new()),
            ))
        };
        let settings = crate::engine::nearness::ProbeSettings {
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
}
