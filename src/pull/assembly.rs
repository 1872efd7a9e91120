//! A fill assembled from the ranged reads running beside it.
//!
//! Parallel ranges of a cold blob (containerd's multipart fetch: 8–16 ranges of 8 MiB or more)
//! are each fetched with a ranged read while the one whole-blob fill runs from byte 0
//! (`range.rs`). Without this module the fill fetches every byte again: twice the upstream traffic
//! and twice the work on the proxy's cores. Here each large ranged read lends its bytes to the
//! fill: they are written into the fill's spool at their offsets (an *extent*), and when the
//! fill's own stream reaches an extent it drops that stream, takes the extent's bytes from the
//! spool (hashing them in order, like its own), follows the extent while its ranged read still
//! brings bytes, and asks its source again from the first byte nobody brought.
//!
//! Who writes which byte is decided under one lock, so a byte of the spool is written once and
//! is what gets hashed:
//! - the fill owns everything below its *frontier*; a contribution below it is refused, and the
//!   fill takes a batch of its own only up to the first extent ahead;
//! - a contribution reserves its bytes before writing them and publishes them once on disk; the
//!   fill reads only published bytes, and before it goes past an extent it closes it (no new
//!   reservation) and waits for what was reserved.
//!
//! Integrity does not rest on the lenders: the fill's digest covers every byte in the spool,
//! whoever wrote it, so a ranged read that brought wrong bytes fails the fill (nothing is
//! committed) and breaks the ranged responses still open, as a wrong upstream does.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

/// Ranges shorter than this do not lend their bytes: the fill would drop its stream and open
/// another (a round trip) to save less than that round trip brings on a fast link.
pub const LEND_MIN: u64 = 8 << 20;

/// An extent whose ranged read brought nothing for this long is not waited for: the fill takes
/// over at its end (the read's client may be slow; the fill must not be).
pub const STALL: Duration = Duration::from_secs(1);

/// Bytes a lender may have on their way to disk; past that it stops lending (its client is
/// never slowed by the disk, and memory stays bounded whatever the chunk sizes).
const LEND_QUEUE: u64 = 4 << 20;

/// What the fill and its lenders share.
#[derive(Default)]
pub struct Assembly {
    inner: Mutex<Inner>,
    /// Bumped whenever an extent grows or closes.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    /// The spool (a write handle), from the fill's start until it has every byte.
    spool: Option<Arc<File>>,
    /// The blob's size, as the fill's source or the first lender's said.
    size: Option<u64>,
    /// Everything below is the fill's.
    frontier: u64,
    /// Extents by start offset; they never overlap.
    extents: BTreeMap<u64, Extent>,
    next_id: u64,
}

#[derive(Clone, Copy, Debug)]
struct Extent {
    id: u64,
    /// Published: on disk.
    end: u64,
    /// Reserved: on its way to disk (`>= end`).
    pending: u64,
    /// Its ranged read may still bring bytes.
    open: bool,
    /// When it last grew.
    grew: Instant,
}

/// An extent as the fill sees it.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub end: u64,
    pub pending: u64,
    pub open: bool,
    pub grew: Instant,
}

impl Assembly {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The fill's spool is open: lending may begin.
    pub fn open(&self, spool: Arc<File>) {
        self.lock().spool = Some(spool);
    }

    /// The fill's source says the blob has `size` bytes: `false` when lenders said otherwise
    /// (then their bytes must not be taken).
    pub fn fix_size(&self, size: u64) -> bool {
        let mut g = self.lock();
        match g.size {
            Some(s) => s == size,
            None => {
                g.size = Some(size);
                true
            }
        }
    }

    /// The fill has every byte: nothing more is lent, whatever comes (the spool is about to be
    /// committed as the blob).
    pub fn seal(&self) {
        let mut g = self.lock();
        g.spool = None;
        g.frontier = u64::MAX;
    }

    /// The fill takes `from..upto` as its own, up to the first extent ahead: the new frontier.
    pub fn claim(&self, from: u64, upto: u64) -> u64 {
        let mut g = self.lock();
        let stop = g
            .extents
            .range(from..)
            .next()
            .map(|(s, _)| *s)
            .unwrap_or(u64::MAX);
        let frontier = upto.min(stop).max(from);
        g.frontier = g.frontier.max(frontier);
        frontier
    }

    /// The extent starting at `at`, if any.
    pub fn at(&self, at: u64) -> Option<View> {
        self.lock().extents.get(&at).map(|e| View {
            end: e.end,
            pending: e.pending,
            open: e.open,
            grew: e.grew,
        })
    }

    /// The extent at `at` grows no more: the fill goes past it once what was reserved is on
    /// disk.
    pub fn close(&self, at: u64) {
        if let Some(e) = self.lock().extents.get_mut(&at) {
            e.open = false;
        }
        self.bump();
    }

    /// The fill leaves the extent at `at` behind (its bytes taken up to `end`): it is the fill's.
    pub fn absorb(&self, at: u64, end: u64) {
        let mut g = self.lock();
        g.extents.remove(&at);
        g.frontier = g.frontier.max(end);
    }

    /// Waits until an extent changes, or `timeout`.
    pub async fn changed(&self, rx: &mut watch::Receiver<u64>, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A lender for a ranged read of a blob of `size` bytes.
    pub fn lender(self: &Arc<Self>, size: u64) -> Lender {
        Lender {
            assembly: self.clone(),
            size,
            extent: None,
            tx: None,
            queued: Arc::new(AtomicU64::new(0)),
            done: false,
        }
    }

    /// Reserves `offset..offset + len` for lender extent `id` (a new extent when `id` is
    /// `None`): the extent's start, or `None` when these bytes are not wanted.
    fn reserve(
        &self,
        id: Option<(u64, u64)>,
        offset: u64,
        len: u64,
        size: u64,
    ) -> Option<(u64, u64)> {
        let mut g = self.lock();
        g.spool.as_ref()?;
        if *g.size.get_or_insert(size) != size || offset + len > size || offset < g.frontier {
            return None;
        }
        let end = offset + len;
        // No other extent may hold any of these bytes.
        // The last extent starting before `end` (other than the lender's own) is the only one
        // that may reach into these bytes: extents never overlap.
        let overlaps = |g: &Inner, own: Option<u64>| {
            g.extents
                .range(..end)
                .next_back()
                .filter(|(s, _)| Some(**s) != own)
                .is_some_and(|(_, e)| e.pending > offset)
        };
        match id {
            None => {
                if overlaps(&g, None) {
                    return None;
                }
                g.next_id += 1;
                let id = g.next_id;
                g.extents.insert(
                    offset,
                    Extent {
                        id,
                        end: offset,
                        pending: end,
                        open: true,
                        grew: Instant::now(),
                    },
                );
                Some((offset, id))
            }
            Some((start, id)) => {
                if overlaps(&g, Some(start)) {
                    return None;
                }
                let e = g.extents.get_mut(&start).filter(|e| e.id == id)?;
                if !e.open || e.pending != offset {
                    return None;
                }
                e.pending = end;
                Some((start, id))
            }
        }
    }

    /// Changes the lender's extent `(start, id)` with `f`, if it is still there (a fill that
    /// went past it, or a later extent at the same offset, is left alone).
    fn update(&self, (start, id): (u64, u64), f: impl FnOnce(&mut Extent)) {
        if let Some(e) = self.lock().extents.get_mut(&start).filter(|e| e.id == id) {
            f(e);
        }
        self.bump();
    }

    /// Bytes of the extent are on disk up to `end`.
    fn publish(&self, ext: (u64, u64), end: u64) {
        self.update(ext, |e| {
            e.end = e.end.max(end);
            e.grew = Instant::now();
        });
    }

    /// The extent ends at what is on disk (a write failed, or its lender went away with
    /// writes lost).
    fn cut(&self, ext: (u64, u64)) {
        self.update(ext, |e| {
            e.open = false;
            e.pending = e.end;
        });
    }

    /// Gives back the reservation from `offset` on (its chunk will not be written): the extent
    /// grows no more.
    fn unreserve(&self, ext: (u64, u64), offset: u64) {
        self.update(ext, |e| {
            e.pending = e.pending.min(offset).max(e.end);
            e.open = false;
        });
    }

    fn spool(&self) -> Option<Arc<File>> {
        self.lock().spool.clone()
    }
}

/// One ranged read lending its bytes, in order, to the fill (see the module). Lending never
/// slows the read: when the disk falls behind, the lender stops. Dropped, its extent closes.
pub struct Lender {
    assembly: Arc<Assembly>,
    size: u64,
    /// (start, id) of the extent once one is reserved.
    extent: Option<(u64, u64)>,
    tx: Option<mpsc::UnboundedSender<(u64, Bytes)>>,
    /// Bytes sent to the writer and not written yet (at most [`LEND_QUEUE`]).
    queued: Arc<AtomicU64>,
    /// Stopped lending.
    done: bool,
}

impl Lender {
    /// Lends `chunk`, the bytes at `offset` the read just brought.
    pub fn lend(&mut self, offset: u64, chunk: &Bytes) {
        if self.done || chunk.is_empty() {
            return;
        }
        let len = chunk.len() as u64;
        let Some(ext) = self.assembly.reserve(self.extent, offset, len, self.size) else {
            // Not wanted (yet, before the spool is open; or no longer): an extent already begun
            // ends here, none begun may still begin later.
            if self.extent.is_some() {
                tracing::debug!(offset, "range stops lending to the fill");
                self.stop();
            }
            return;
        };
        if self.extent.is_none() {
            tracing::debug!(offset, "range lends its bytes to the fill");
        }
        if self.tx.is_none() {
            let Some(file) = self.assembly.spool() else {
                self.assembly.cut(ext);
                self.done = true;
                return;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(write(
                self.assembly.clone(),
                ext,
                file,
                rx,
                self.queued.clone(),
            ));
            self.tx = Some(tx);
        }
        self.extent = Some(ext);
        // Counted before it is sent: the writer subtracts what it wrote.
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        let sent = before + len <= LEND_QUEUE
            && self
                .tx
                .as_ref()
                .is_some_and(|tx| tx.send((offset, chunk.clone())).is_ok());
        if !sent {
            self.queued.fetch_sub(len, Ordering::Relaxed);
        }
        if !sent {
            tracing::debug!(
                offset,
                "range stops lending to the fill: the spool writes are behind"
            );
            // The disk is behind: this chunk is not written, so the extent ends before it.
            self.assembly.unreserve(ext, offset);
            self.stop();
        }
    }

    fn stop(&mut self) {
        self.done = true;
        // The writer publishes what is queued, then closes the extent when the queue ends.
        self.tx = None;
        if let Some(ext) = self.extent {
            self.assembly.update(ext, |e| e.open = false);
        }
    }
}

impl Drop for Lender {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a lender's chunks at their offsets and publishes each batch once on disk.
async fn write(
    assembly: Arc<Assembly>,
    ext: (u64, u64),
    file: Arc<File>,
    mut rx: mpsc::UnboundedReceiver<(u64, Bytes)>,
    queued: Arc<AtomicU64>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(c) = rx.try_recv() {
            batch.push(c);
        }
        let bytes: u64 = batch.iter().map(|(_, c)| c.len() as u64).sum();
        let file = file.clone();
        let wrote = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut end = 0;
            for (offset, c) in &batch {
                file.write_all_at(c, *offset)?;
                end = offset + c.len() as u64;
            }
            Ok::<_, std::io::Error>(end)
        })
        .await;
        queued.fetch_sub(bytes, Ordering::Relaxed);
        match wrote {
            Ok(Ok(end)) => assembly.publish(ext, end),
            _ => {
                assembly.cut(ext);
                return;
            }
        }
    }
    // The lender is gone and everything it queued is on disk.
    assembly.cut(ext);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assembly(size: u64) -> (Arc<Assembly>, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap();
        let a = Arc::new(Assembly::default());
        a.open(Arc::new(w));
        assert!(a.fix_size(size));
        (a, f)
    }

    async fn settled(a: &Assembly, at: u64) -> View {
        let mut rx = a.watch();
        loop {
            let v = a.at(at).expect("extent");
            if !v.open && v.pending == v.end {
                return v;
            }
            a.changed(&mut rx, Duration::from_millis(100)).await;
        }
    }

    /// A lender's bytes land in the spool at their offsets; the fill stops its own batch at the
    /// extent and refuses nothing of its own.
    #[tokio::test]
    async fn lent_bytes_land_at_their_offsets_and_stop_the_fill_there() {
        let (a, f) = assembly(100);
        let mut l = a.lender(100);
        l.lend(40, &Bytes::from_static(&[7; 10]));
        l.lend(50, &Bytes::from_static(&[8; 10]));
        drop(l);
        let v = settled(&a, 40).await;
        assert_eq!(v.end, 60);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[40..50], &[7; 10]);
        assert_eq!(&on_disk[50..60], &[8; 10]);
        // The fill's batch 0..64 stops at the extent.
        assert_eq!(a.claim(0, 64), 40);
        assert_eq!(a.claim(40, 64), 40);
        a.absorb(40, 60);
        assert_eq!(a.claim(60, 100), 100);
    }

    /// Bytes below the fill's frontier, bytes another extent holds, bytes of another size of
    /// blob: not lent. A lender whose bytes stop being wanted ends its extent there.
    #[tokio::test]
    async fn what_the_fill_or_another_lender_owns_is_not_lent() {
        let (a, _f) = assembly(100);
        assert_eq!(a.claim(0, 30), 30);
        let mut below = a.lender(100);
        below.lend(20, &Bytes::from_static(&[1; 10]));
        assert!(a.at(20).is_none(), "below the frontier");
        let mut first = a.lender(100);
        first.lend(50, &Bytes::from_static(&[2; 10]));
        let mut second = a.lender(100);
        second.lend(55, &Bytes::from_static(&[3; 10]));
        assert!(a.at(55).is_none(), "overlapping another extent");
        let mut other = a.lender(99);
        other.lend(80, &Bytes::from_static(&[4; 10]));
        assert!(a.at(80).is_none(), "another size");
        // A second extent right after the first one is fine.
        let mut next = a.lender(100);
        next.lend(60, &Bytes::from_static(&[5; 10]));
        assert!(a.at(60).is_some());
        // The first lender's next bytes would run into it: its extent ends at 60.
        first.lend(60, &Bytes::from_static(&[6; 10]));
        let v = settled(&a, 50).await;
        assert_eq!((v.end, v.pending), (60, 60));
    }

    /// Before the fill has its spool nothing is lent; a lender may begin later, mid-read.
    #[tokio::test]
    async fn lending_begins_once_the_spool_is_open() {
        let a = Arc::new(Assembly::default());
        let mut l = a.lender(100);
        l.lend(10, &Bytes::from_static(&[1; 10]));
        assert!(a.at(10).is_none());
        let f = tempfile::NamedTempFile::new().unwrap();
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap();
        a.open(Arc::new(w));
        l.lend(20, &Bytes::from_static(&[2; 10]));
        drop(l);
        assert_eq!(settled(&a, 20).await.end, 30);
    }

    /// A lender whose writes fall behind stops lending at [`LEND_QUEUE`] bytes on their way:
    /// memory stays bounded, and its extent ends where its bytes stop (the writer task cannot
    /// run before this test yields, as a disk far behind).
    #[tokio::test]
    async fn a_lender_ahead_of_its_writes_stops_at_the_bound() {
        let (a, f) = assembly(16 << 20);
        let mut l = a.lender(16 << 20);
        let chunk = Bytes::from(vec![9u8; 64 << 10]);
        for i in 0..80u64 {
            l.lend(i * (64 << 10), &chunk);
        }
        assert!(l.done, "it stopped lending");
        assert!(l.queued.load(Ordering::Relaxed) <= LEND_QUEUE);
        drop(l);
        let v = settled(&a, 0).await;
        assert_eq!(
            v.end, LEND_QUEUE,
            "the extent ends where the queued bytes end"
        );
        assert!(std::fs::metadata(f.path()).unwrap().len() >= LEND_QUEUE);
    }
}
