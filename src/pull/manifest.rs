//! Manifest answers, by digest (the local engine, else the remote engines nearest first, stored
//! locally on the way) and by tag (from the tag's authority: the preferred engine for pushed
//! repositories, the upstream for mirrored ones, the storage engines otherwise; stale answers
//! while the authority is down), and the tag and referrers lists.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{tags, Puller};
use crate::engine::set::Routed;
use crate::engine::{Content, Engine, EngineExt, Manifest};
use crate::error::{Error, Result};
use crate::oci::{media, Digest, ErrorCode, Reference, Tag};

/// A manifest answer.
pub struct ManifestAnswer {
    pub manifest: Manifest,
    pub source: Arc<str>,
    /// How old a tag answer is when it was served stale (the authority was unreachable).
    pub stale_age: Option<Duration>,
}

impl Puller {
    /// A manifest by tag or digest.
    pub async fn manifest(
        &self,
        r: &Routed,
        reference: &Reference,
        accept: &[String],
    ) -> Result<ManifestAnswer> {
        match reference {
            Reference::Digest(d) => {
                let (manifest, source) = self.manifest_by_digest(r, d, accept).await?;
                Ok(ManifestAnswer {
                    manifest,
                    source,
                    stale_age: None,
                })
            }
            Reference::Tag(t) => self.manifest_by_tag(r, t, accept).await,
        }
    }

    async fn manifest_by_digest(
        &self,
        r: &Routed,
        digest: &Digest,
        accept: &[String],
    ) -> Result<(Manifest, Arc<str>)> {
        self.check_pushed(r, Content::Manifest(digest.clone()))
            .await?;
        let local_ok = self.engines.local_usable();
        let by_digest = Reference::Digest(digest.clone());
        // With the local engine down, only what its caching engine holds in memory is served.
        let found = if local_ok {
            self.local
                .get_manifest(&r.storage_repo, &by_digest, accept)
                .await
        } else {
            Ok(self.local.remembered_manifest(digest))
        };
        match found {
            Ok(Some(m)) => {
                self.metrics.cache("manifest", "hit");
                let content = Content::Manifest(digest.clone());
                self.local_hit(r, content, m.bytes.len() as u64, Some(&m));
                return Ok((m, self.local_name.clone()));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "local engine manifest read failed"),
        }
        self.metrics.cache("manifest", "miss");
        let mut last_err = None;
        for (engine, repo) in self.engines.remotes_for(r) {
            self.metrics.engine_request(engine.id());
            match engine.get_manifest(&repo, &by_digest, accept).await {
                Ok(Some(m)) => {
                    // With the local engine down the manifest is served, not stored.
                    if !local_ok {
                    } else if let Err(e) = self.local.put_manifest(&r.storage_repo, &m).await {
                        tracing::warn!(error = %e, "manifest not stored in the local engine");
                    } else if let Some(ev) = &self.evictor {
                        ev.manifest_seen(&r.storage_repo, &m, Some(true));
                    }
                    return Ok((m, engine.id().into()));
                }
                Ok(None) => {}
                Err(e) if e.is_answer() => return Err(e),
                Err(e) => {
                    self.metrics.upstream_error(engine.id());
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| {
            Error::client(
                ErrorCode::ManifestUnknown,
                format!("manifest {digest} is unknown"),
            )
        }))
    }

    async fn manifest_by_tag(
        &self,
        r: &Routed,
        tag: &Tag,
        accept: &[String],
    ) -> Result<ManifestAnswer> {
        let repo = &r.storage_repo;
        if let Some(pref) = self.push_authority(r).await {
            if let Some(ans) = self.pushed_tag(r, tag, accept, &pref).await? {
                return Ok(ans);
            }
        }
        let Some(upstream) = self.engines.upstream(r) else {
            return self.storage_tag(r, tag, accept).await;
        };
        let fresh = self.tags.fresh(repo, tag).await;
        if let Some(e) = &fresh {
            // The key is made only for the rare client the fresh type does not suit.
            if media::accepts(accept, &e.media_type) || self.tags.unnegotiable(repo, tag) {
                return self.tag_hit(r, &e.digest, accept).await;
            }
        }
        // Under the quota reserve, a tag with a stale copy is not revalidated at all: the pulls
        // left are kept for content nobody has yet.
        if fresh.is_none() && upstream.quota_low() {
            if let Some(ans) = self.stale_tag(r, tag, accept).await? {
                tracing::debug!(upstream = %upstream.name, %tag, "quota under the reserve: served stale");
                return Ok(ans);
            }
        }
        // Revalidate with the authority: a HEAD, which Docker Hub does not count as a pull.
        let by_tag = Reference::Tag(tag.clone());
        match upstream
            .engine
            .head_manifest(&r.upstream_repo, &by_tag, accept)
            .await
        {
            Ok(Some(meta)) => {
                self.metrics.cache("tag", "revalidated");
                // The manifest first: a tag answer is recorded only once its manifest is at hand
                // (an upstream rewriting for old clients names digests it cannot serve).
                let (manifest, source) =
                    match self.manifest_by_digest(r, &meta.digest, accept).await {
                        Ok(found) => found,
                        Err(e) if fresh.is_some() || e.is_answer() => {
                            return self.serve_as_is(r, tag, fresh, accept, e).await
                        }
                        // The new manifest cannot be had (a 429 on its GET, the upstream gone
                        // since the HEAD): the last known answer, within `max_stale`.
                        Err(e) => return self.stale_or(r, tag, accept, e).await,
                    };
                let old = self
                    .tags
                    .insert(repo, tag, meta.digest.clone(), meta.media_type.clone())
                    .await;
                if old.as_ref() != Some(&meta.digest) && self.engines.local_usable() {
                    // Persist the answer so it survives a restart as the stale fallback.
                    if let Err(e) = self.local.put_tag(repo, tag, &meta.digest).await {
                        tracing::warn!(error = %e, "tag link not stored in the local engine");
                    }
                }
                Ok(ManifestAnswer {
                    manifest,
                    source,
                    stale_age: None,
                })
            }
            Ok(None) if fresh.is_some() => {
                let e = Error::client(
                    ErrorCode::ManifestUnknown,
                    "no manifest of an accepted type",
                );
                self.serve_as_is(r, tag, fresh, accept, e).await
            }
            Ok(None) => {
                self.tags.forget(repo, tag).await;
                Err(Error::client(
                    ErrorCode::ManifestUnknown,
                    format!("{}:{tag} is unknown upstream", r.upstream_repo),
                ))
            }
            Err(e) if e.is_answer() => Err(e),
            Err(e) if fresh.is_some() => self.serve_as_is(r, tag, fresh, accept, e).await,
            Err(e) => {
                self.metrics.upstream_error(upstream.engine.id());
                self.stale_or(r, tag, accept, e).await
            }
        }
    }

    /// The upstream failed to answer for `tag` (`why`: down, rate limiting, backing off): the
    /// last known answer if younger than `max_stale`, else `why` for a refusal that says when to
    /// come back (`429`/`503` with `Retry-After`), else `UNAVAILABLE`.
    async fn stale_or(
        &self,
        r: &Routed,
        tag: &Tag,
        accept: &[String],
        why: Error,
    ) -> Result<ManifestAnswer> {
        tracing::warn!(error = %why, "tag authority unreachable; trying a stale answer");
        if let Some(ans) = self.stale_tag(r, tag, accept).await? {
            return Ok(ans);
        }
        if why.retry_after().is_some() || why.is_rate_limited() {
            return Err(why);
        }
        let name = self
            .engines
            .upstream(r)
            .map(|u| u.name.as_str())
            .unwrap_or("upstream");
        Err(Error::client(
            ErrorCode::Unavailable,
            format!(
                "upstream {name} is unreachable and no cached answer for {}:{tag} is younger than max_stale",
                r.storage_repo
            ),
        ))
    }

    /// The authority answered this tag moments ago (`fresh`) with a type this client does not
    /// accept, and now offers no other it can serve (Distribution rewrites to schema 1 for such
    /// clients, or refuses): serve the fresh answer as it is, as registries answer with the type
    /// they have, and do not ask again for each such request until the TTL. `why` is returned
    /// when there is no fresh answer after all.
    async fn serve_as_is(
        &self,
        r: &Routed,
        tag: &Tag,
        fresh: Option<tags::TagEntry>,
        accept: &[String],
        why: Error,
    ) -> Result<ManifestAnswer> {
        let Some(entry) = fresh else {
            return Err(why);
        };
        tracing::debug!(error = %why, "no other media type upstream; serving the fresh answer");
        self.tags.set_unnegotiable(&r.storage_repo, tag);
        self.tag_hit(r, &entry.digest, accept).await
    }

    /// The answer for a tag whose fresh digest is known.
    async fn tag_hit(
        &self,
        r: &Routed,
        digest: &Digest,
        accept: &[String],
    ) -> Result<ManifestAnswer> {
        self.metrics.cache("tag", "hit");
        let (manifest, source) = self.manifest_by_digest(r, digest, accept).await?;
        Ok(ManifestAnswer {
            manifest,
            source,
            stale_age: None,
        })
    }

    /// A tag of a pushed repository: the preferred engine is its authority. `None` when the
    /// preferred engine does not have the tag (then the upstream, if any, decides).
    async fn pushed_tag(
        &self,
        r: &Routed,
        tag: &Tag,
        accept: &[String],
        pref: &Arc<dyn crate::engine::Engine>,
    ) -> Result<Option<ManifestAnswer>> {
        // The preferred engine's caching engine remembers the link for `tag_ttl` (and sees the
        // pushes of this process at once).
        match pref.tag_link(&r.storage_repo, tag).await {
            Ok(Some(link)) => self.tag_hit(r, &link.digest, accept).await.map(Some),
            Ok(None) => Ok(None),
            Err(e) => {
                // The authority is unreachable: the replicated tag link of the local engine is
                // the last known answer.
                self.metrics.upstream_error(pref.id());
                tracing::warn!(error = %e, "preferred engine unreachable; trying a stale answer");
                self.stale_tag(r, tag, accept).await
            }
        }
    }

    /// A tag no upstream owns: stored content (written by ociedge or by docker-registry in some
    /// region). The local engine answers first, then the storage engines nearest first; an answer
    /// is trusted for `tag_ttl`.
    async fn storage_tag(
        &self,
        r: &Routed,
        tag: &Tag,
        accept: &[String],
    ) -> Result<ManifestAnswer> {
        let repo = &r.storage_repo;
        let (digest, cached) = match self.tags.fresh(repo, tag).await {
            Some(e) => {
                self.metrics.cache("tag", "hit");
                (e.digest, true)
            }
            None => {
                let mut engines: Vec<Arc<dyn crate::engine::Engine>> = Vec::new();
                if self.engines.local_usable() {
                    engines.push(self.engines.local().clone());
                }
                engines.extend(self.engines.remotes_for(r).into_iter().map(|(e, _)| e));
                let mut found = None;
                let mut last_err = None;
                for e in engines {
                    match e.tag_link(repo, tag).await {
                        Ok(Some(link)) => {
                            found = Some(link.digest);
                            break;
                        }
                        Ok(None) => {}
                        Err(err) => last_err = Some(err),
                    }
                }
                let Some(d) = found else {
                    return Err(last_err.unwrap_or_else(|| {
                        Error::client(
                            ErrorCode::ManifestUnknown,
                            format!("{repo}:{tag} is unknown"),
                        )
                    }));
                };
                self.metrics.cache("tag", "revalidated");
                (d, false)
            }
        };
        let (manifest, source) = self.manifest_by_digest(r, &digest, accept).await?;
        if !cached {
            self.tags
                .insert(repo, tag, digest, manifest.media_type.clone())
                .await;
        }
        Ok(ManifestAnswer {
            manifest,
            source,
            stale_age: None,
        })
    }

    /// The last known answer for a tag, if younger than `max_stale`: from memory, else from the
    /// local engine's tag link (which survives restarts).
    async fn stale_tag(
        &self,
        r: &Routed,
        tag: &Tag,
        accept: &[String],
    ) -> Result<Option<ManifestAnswer>> {
        let repo = &r.storage_repo;
        let (digest, age) = if let Some(e) = self.tags.stale(repo, tag).await {
            (e.digest, e.fetched.elapsed())
        } else {
            let link = if self.engines.local_usable() {
                self.engines.local().tag_link(repo, tag).await
            } else {
                Ok(None)
            };
            match link {
                Ok(Some(link)) => {
                    let age = link
                        .modified
                        .and_then(|m| SystemTime::now().duration_since(m).ok())
                        .unwrap_or(Duration::MAX);
                    if age >= self.tags.max_stale() {
                        return Ok(None);
                    }
                    (link.digest, age)
                }
                _ => return Ok(None),
            }
        };
        let Ok((manifest, source)) = self.manifest_by_digest(r, &digest, accept).await else {
            return Ok(None);
        };
        self.metrics.cache("tag", "stale");
        self.metrics.stale_tag();
        Ok(Some(ManifestAnswer {
            manifest,
            source,
            stale_age: Some(age),
        }))
    }

    /// All tags of a repository, from the authority (or the local engine while it is down).
    pub async fn tags(&self, r: &Routed) -> Result<Vec<String>> {
        let local = self.engines.local();
        if let Some(pref) = self.push_authority(r).await {
            // Pushed: the preferred engine's tags, with the upstream's where it knows the name
            // too (a tag not pushed here is still resolved upstream).
            let mut tags = pref.list_tags(&r.storage_repo).await?.unwrap_or_default();
            if let Some(u) = self.engines.upstream(r) {
                match u.engine.list_tags(&r.upstream_repo).await {
                    Ok(Some(t)) => tags.extend(t),
                    Ok(None) => {}
                    Err(e) if e.is_answer() => {}
                    Err(e) => {
                        self.metrics.upstream_error(u.engine.id());
                        tracing::warn!(error = %e, "tags list: upstream unreachable; pushed tags only");
                    }
                }
            }
            tags.sort();
            tags.dedup();
            return Ok(tags);
        }
        if let Some(u) = self.engines.upstream(r) {
            match u.engine.list_tags(&r.upstream_repo).await {
                Ok(Some(t)) => return Ok(t),
                Ok(None) => {
                    return Err(Error::client(
                        ErrorCode::NameUnknown,
                        format!("repository {} is unknown upstream", r.upstream_repo),
                    ))
                }
                Err(e) if e.is_answer() => return Err(e),
                Err(e) => {
                    self.metrics.upstream_error(u.engine.id());
                    tracing::warn!(error = %e, "tags list from the local engine: authority unreachable");
                }
            }
        }
        local.list_tags(&r.storage_repo).await?.ok_or_else(|| {
            Error::client(
                ErrorCode::NameUnknown,
                format!("repository {} is unknown", r.storage_repo),
            )
        })
    }

    /// The referrers index of a manifest, passed through from the upstream; an empty index when
    /// nobody has referrers for it.
    pub async fn referrers(
        &self,
        r: &Routed,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<(Bytes, bool)> {
        if let Some(u) = self.engines.upstream(r) {
            if let Some(found) = u
                .engine
                .referrers(&r.upstream_repo, digest, artifact_type)
                .await?
            {
                return Ok(found);
            }
        }
        let empty = serde_json::json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": [] });
        Ok((Bytes::from(empty.to_string()), artifact_type.is_some()))
    }
}
