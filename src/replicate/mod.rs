//! Replication: pushed content copied from the preferred engine to every replication location,
//! through a durable queue (`queue.rs`) run by a background worker (`worker.rs`), in dependency
//! order (`copy.rs`), and the one-time `backfill` of an engine added later (`backfill.rs`).

pub mod backfill;
pub mod copy;
pub mod queue;
pub mod task;
pub mod worker;

pub use task::Job;
pub use worker::Replicator;
