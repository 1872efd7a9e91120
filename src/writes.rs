//! A process-wide count of the requests that may write (pushes, tag moves, deletes), moved as
//! each one begins and as it ends. Memos of read answers (the front's answer memo, the pull
//! path's memo of what a pushed repository links) record the count they were made under and are
//! used only while it has not moved: whatever the write was, the next read after it cannot be
//! answered from before it.

use std::sync::atomic::{AtomicU64, Ordering};

static COUNT: AtomicU64 = AtomicU64::new(0);

/// A request that may write begins or ends.
pub fn moved() {
    COUNT.fetch_add(1, Ordering::AcqRel);
}

/// The count now: read it before looking, record it with what was seen.
pub fn count() -> u64 {
    COUNT.load(Ordering::Acquire)
}
