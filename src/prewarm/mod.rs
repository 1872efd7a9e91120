//! Prewarming: fill the local engine (and, with `replicate`, every storage engine) with named
//! images before a rollout, through the normal pull path.
//!
//! A job (`POST /_ociedge/prewarm`, `ociedge prewarm`) names images as clients write them; each
//! is routed as a pull is ([`crate::engine::set::Engines::route`]), its manifest fetched (an
//! index: every platform, or the listed ones), then every blob through the single-flight fill
//! clients join (digests verified before anything is committed). `replicate` then copies every
//! blob and manifest into every other storage engine with the replication worker's
//! [`Copier`](crate::replicate::copy::Copier). `pin_until` pins what the job fetched
//! ([`crate::evict::pins`]).
//!
//! `job.rs` is the job as data (what was asked, validated; the progress record), `store.rs` its
//! durable records in the preferred engine, `run.rs` the runner. Jobs survive a restart: a
//! process resumes every unfinished record at start, and re-running a job is cheap (content
//! already present counts as done without a transfer).

pub mod job;
pub mod run;
pub mod store;

pub use job::{parse_image, Record, Spec};
pub use run::Prewarmer;
