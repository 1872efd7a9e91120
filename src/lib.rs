//! ociedge: an edge pull-through cache for container images.
//!
//! # Architecture, by file
//! - `http/`: the front. `route.rs` is the one route table (the `/v2/` grammar parsed by hand),
//!   `pull.rs` the thin read handlers, `ops.rs` health, readiness, metrics and status,
//!   `server.rs` the listeners, connection cap and graceful shutdown, `conn.rs` one connection
//!   (TLS handshake, HTTP/1.1 or HTTP/2 by hyper, idle and header timeouts), `fast.rs` the
//!   plain HTTP/1.1 front for bodiless GET/HEAD (local blobs by `sendfile`; everything else
//!   handed to hyper through `rewind.rs`), `answers.rs` its 100 ms memo of small answers (made
//!   with the listeners, not part of `App`), `body.rs` the body types, `tls.rs` the rustls
//!   acceptor and certificate reloading.
//! - `app.rs`: `App`, everything a request needs (engines, puller, pusher, auth, metrics), built
//!   from the config; below `http/`, which it never imports.
//! - `fileio.rs`: `ByteStream` (the body stream every layer passes), local file reads in large
//!   chunks, spools, and the checked opens of a `file://` engine (no link followed, regular
//!   files only, the committed size recorded on the inode), and the memory budgets (per
//!   connection, per process) of file reads not sent yet.
//! - `pull/`: the pull path. `mod.rs` (`Puller`): which engine is the authority of a name;
//!   `blob.rs`: hits as the engine serves them, misses through fills; `manifest.rs`: manifests,
//!   tags by their authority, stale answers; `fill.rs`: the single-flight fill of the local
//!   engine (who leads it is a type, `Joined::Leader`/`Follower`: a dropped leader fails the
//!   fill for its followers); `range.rs`: ranges of cold blobs (from the fill or a ranged read,
//!   whichever is sooner; broken by a mismatch verdict); `tags.rs`: upstream tag answers;
//!   `rate.rs`: the minimum rate a fill's source keeps.
//! - `engine/`: the `Engine` trait (13 methods, each with its contract; `EngineExt` the
//!   conveniences), `caching.rs` the `CachingEngine` that wraps every engine once and owns every
//!   memo of the read path (it sees this process's writes, moves the `Generation` the front's
//!   answer memo keys on, and states how late it sees other processes' writes), and the two
//!   kinds of engine, `storage.rs` (object_store in the
//!   Distribution layout, `layout.rs`) and `registry/` (upstream registries, with token auth
//!   sent only to allowed realms, `limit.rs` the bounds and deadlines of what they answer);
//!   `set.rs` routes names to upstreams, one storage name per (upstream, repository), and
//!   orders remote engines; `pushed.rs` marks repositories pushed beside upstreams; `nofollow.rs` keeps a `file://`
//!   engine's object store from following symbolic links, `scrub.rs` is `ociedge verify`.
//! - `push/`: the push path (`Pusher`: uploads, manifests, tags, deletes, replication jobs
//!   queued); `forward.rs` streams writes to an upstream registry when pushes are forwarded
//!   (it hands back a plain `ByteStream` body: only `http/` speaks HTTP bodies).
//! - `cluster/`: processes sharing the local engine as one cache (`cluster:`): fill leases in the
//!   engine (`_ociedge/fills/`), the lease holder's fill as the first source of the others'
//!   fills (`peer.rs`, served by the holder at `/_ociedge/cluster/fills/`), and the digests each
//!   process is reading, published for eviction (`reading.rs`).
//! - `replicate/`: the durable queue and workers that copy pushed content to the other storage
//!   engines; `evict/`: keeps the local engine under `cache.max_size` (`pins.rs`: what it
//!   keeps until a time, whatever its last access).
//! - `prewarm/`: jobs that pull named images through the pull path ahead of a rollout (and with
//!   `replicate` copy them into every storage engine), durable in the preferred engine and
//!   resumed at start; `job.rs` the job as data, `store.rs` its records, `run.rs` the runner.
//! - `error.rs`: the crate's error; engine failures by kind (`EngineError`: not found, already
//!   exists, precondition, denied, rate limited, transient, permanent, …, with their source),
//!   which failover, replication retries and the push path decide on; OCI codes are chosen from
//!   them in one place, `Error::to_oci`, which `http/` calls.
//! - `oci/`: validated names, digests, media types, wire errors, and manifest parsing
//!   (`manifest.rs`: what a manifest references). `config/`: the config tree (`urls.rs` checks
//!   storage URLs and token realms without connecting).
//! - `metrics.rs`: the Prometheus counters, and the names they record (`LOCAL`, `FillResult`);
//!   `history.rs`: the last hour of them, sampled in memory for the status page (`http/page.rs`
//!   serves `http/status.html` at `/_ociedge/`).
//! - `auth/`: access control (htpasswd users, ES256 tokens, per-repository rules, passthrough
//!   checks against upstreams, `throttle.rs` for failed passwords); `http/access.rs` applies
//!   it per route, `http/token.rs` is `/token`. `SECURITY.md` has the threat model.
//!
//! # Layers
//! A module imports only modules below it; `tests/module_graph.rs` fails on any circle between
//! top-level modules. Low to high: `oci` → `error` → `config` → `metrics` (→ `history`) →
//! `fileio` → `engine` → `cluster` → `replicate` → `evict` → `pull` → `push` → `prewarm` → `auth` →
//! `app` → `http`.
//! `main.rs` may use anything; `fuzzing.rs` (for the fuzz targets) may use anything and nothing
//! uses it.
//!
//! # The miss path
//! `GET /v2/library/alpine/blobs/sha256:…` is parsed into `Route::Blob` (bad names and digests
//! are refused here, before any I/O) and routed to its upstream (`?ns=`, a registry prefix, or the
//! default; `alpine` means `library/alpine` on Docker Hub). The `Puller` looks in the local engine;
//! on a miss it joins the fill running for that digest or starts one. The fill is a detached task:
//! it asks the remote engines in order, streams the first one that has the blob into a spool file
//! while hashing it, resumes from the byte reached on the next engine if a stream breaks, and
//! commits to the local engine only once the digest matches. Every request for the digest reads
//! the spool as it grows, at its own pace, and is sent the final byte only after the verdict, so a
//! bad upstream yields a broken response, never a clean wrong one. A `Range` on a miss is
//! answered at once instead (`pull/range.rs`): from the fill where it has (or is about to have)
//! the bytes, else by a ranged read of the nearest engine while the fill goes on; ranges cannot
//! be verified alone, so they do not wait for the verdict, but a mismatch breaks those in flight.

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod error;
pub mod evict;
pub mod fileio;
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod http;
pub mod metrics;
pub mod oci;
pub mod prewarm;
pub mod pull;
pub mod push;
pub mod replicate;

pub use error::{Error, Result};
