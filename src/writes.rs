//! A process-wide count of writes: moved as each request that may write (a push, a tag move, a
//! delete) begins and as it ends, and as blob data stored by any engine of this process (a
//! fill's commit, a push, a replica) becomes visible. Memos of read answers (the front's answer
//! memo, the pull path's memos of local absences and of what a pushed repository links) record
//! the count they were made under and are used only while it has not moved: whatever the write
//! was, the next read after it cannot be answered from before it.

use std::sync::atomic::{AtomicU64, Ordering};

static COUNT: AtomicU64 = AtomicU64::new(0);

/// A request that may write begins or ends, or blob data was stored.
pub fn moved() {
    COUNT.fetch_add(1, Ordering::AcqRel);
}

/// The count now: read it before looking, record it with what was seen.
pub fn count() -> u64 {
    COUNT.load(Ordering::Acquire)
}
