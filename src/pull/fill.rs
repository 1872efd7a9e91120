//! Fills: one background copy per digest from the nearest remote engine into the local engine,
//! which every concurrent request for that digest reads from as it grows.
//!
//! A fill is a detached task (`run_fill`) that owns the transfer: no client can slow it (readers
//! read at their own pace, never through a channel the fill waits on) or cancel it (dropping a
//! response drops only that reader). Readers keeping up with the fill take its chunks from a small
//! window of the most recent ones in memory; a reader that fell behind reads the spool file. Bytes land in a spool file first and are hashed on the way;
//! only a whole, verified blob is committed to the local engine. Readers never see the end of the
//! blob before the verdict: the last byte is held back until the digest has been checked, so a
//! client that was sent wrong bytes gets a broken response, never a clean one.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tracing::Instrument;

use super::assembly::{Assembly, STALL};
use super::rate::{self, MinRate};
use crate::engine::EngineExt;
use crate::engine::{ByteRange, ByteStream, Engine, GetBlob};
use crate::error::{EngineError, Error, Result};
use crate::metrics::{FillResult, Metrics};
use crate::oci::{Digest, ErrorCode, RepoName, Verifier};

/// Writes are batched up to this many bytes when the network delivers faster than the disk.
const WRITE_BATCH: usize = 1 << 20;

/// Bytes of the most recent chunks kept in memory for readers that keep up with the fill: enough
/// to absorb the jitter of a client on a fast link, small enough that memory stays flat whatever
/// the number of fills and readers. Chunks still on their way to disk are kept on top of it.
const WINDOW: usize = 2 << 20;

/// How a fill ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Verified and committed (or verified but the commit failed: readers still got good bytes).
    Done,
    /// No engine had the blob.
    NotFound,
    /// The transfer failed or the digest did not match: the error that ended it, with its kind
    /// (what every reader of the fill is answered).
    Failed(Error),
}

/// The state readers watch.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Total size, known once a source answered.
    pub size: Option<u64>,
    /// Engine id the bytes come from (the first one, for `X-Ociedge-Source`).
    pub source: Option<Arc<str>>,
    /// Bytes in the spool file.
    pub written: u64,
    /// Bytes readers may take: in the spool file or in the window (at least `written`).
    pub received: u64,
    /// The whole blob is in the spool and matched its digest.
    pub verified: bool,
    pub outcome: Option<Outcome>,
    /// When a source answered (with `received`, the fill's rate so far: ranged readers decide by
    /// it whether to wait for the fill or fetch their range themselves).
    pub since: Option<tokio::time::Instant>,
}

/// One fill in flight.
pub struct FillState {
    pub digest: Digest,
    progress: watch::Sender<Progress>,
    /// Read handle of the spool file (readers `pread` it; it stays valid after the file is
    /// renamed, linked or unlinked).
    spool: OnceLock<Arc<File>>,
    /// The most recent chunks, so readers that keep up need no disk read. Held only to push,
    /// evict or clone a chunk.
    window: Mutex<Window>,
    /// Bytes lent by ranged reads running beside the fill (`assembly.rs`).
    assembly: Arc<Assembly>,
    /// A reader wants the fill's bytes from the start: a lazy fill (see [`FillPlan::lazy`])
    /// waits for this.
    wanted: watch::Sender<bool>,
}

/// Chunks of the blob ending at `Progress::received`.
#[derive(Default)]
struct Window {
    /// (offset, bytes), in offset order; a gap where the fill took lent bytes from the spool.
    chunks: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl Window {
    fn push(&mut self, offset: u64, chunk: Bytes) {
        self.bytes += chunk.len();
        self.chunks.push_back((offset, chunk));
    }

    /// Drops the oldest chunks beyond [`WINDOW`], but only those already in the spool file:
    /// a reader that misses the window must find its bytes on disk.
    fn trim(&mut self, written: u64) {
        while let Some((off, c)) = self.chunks.front() {
            if self.bytes - c.len() < WINDOW || off + c.len() as u64 > written {
                break;
            }
            self.bytes -= c.len();
            self.chunks.pop_front();
        }
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.bytes = 0;
    }

    /// Up to `want` bytes from `pos`, if the window still holds `pos`.
    fn get(&self, pos: u64, want: u64) -> Option<Bytes> {
        let first = self.chunks.front()?.0;
        if pos < first {
            return None;
        }
        // The chunk holding `pos`: the last one starting at or before it.
        let i = self.chunks.partition_point(|(off, _)| *off <= pos);
        let (off, c) = self.chunks.get(i.checked_sub(1)?)?;
        let start = usize::try_from(pos - off).ok()?;
        if start >= c.len() {
            return None;
        }
        let len = usize::try_from(want)
            .unwrap_or(usize::MAX)
            .min(c.len() - start);
        Some(c.slice(start..start + len))
    }
}

/// The single-flight table. `join_or_start` either joins the fill running for a digest or
/// makes the caller the fill's [`FillLeader`].
#[derive(Clone)]
pub struct Fills {
    inner: Arc<FillsInner>,
}

struct FillsInner {
    running: Mutex<HashMap<Digest, Arc<FillState>>>,
    /// Told about every committed fill (cached content, evictable).
    evictor: OnceLock<Arc<crate::evict::Evictor>>,
    spool_dir: PathBuf,
    metrics: Metrics,
    /// The rate every source stream must keep (below it the fill moves to the next engine).
    min_rate: OnceLock<MinRate>,
}

/// What the fill task needs to run.
pub struct FillPlan {
    /// Engines to ask, in order, with the repository name each knows the blob under.
    pub sources: Vec<(Arc<dyn Engine>, RepoName)>,
    /// Where a verified blob is committed, and the repository to link it into; `None` when the
    /// local engine is unusable (the bytes are still streamed to clients).
    pub target: Option<(Arc<dyn Engine>, RepoName)>,
    /// Started for a range far into the blob: the fill waits (at most [`LAZY`]) until a reader
    /// wants its bytes or that range's own read is over, so that read does not share the link
    /// and the cores with the whole blob.
    pub lazy: bool,
}

/// The longest a lazy fill waits before it starts anyway.
pub const LAZY: std::time::Duration = std::time::Duration::from_millis(100);

impl Fills {
    pub fn new(spool_dir: PathBuf, metrics: Metrics) -> Fills {
        Fills {
            inner: Arc::new(FillsInner {
                running: Mutex::new(HashMap::new()),
                evictor: OnceLock::new(),
                spool_dir,
                metrics,
                min_rate: OnceLock::new(),
            }),
        }
    }

    /// Committed fills are reported to `e` from now on.
    pub fn set_evictor(&self, e: Arc<crate::evict::Evictor>) {
        let _ = self.inner.evictor.set(e);
    }

    /// Sets the minimum rate of source streams (once; the default otherwise).
    pub fn set_min_rate(&self, rate: MinRate) {
        let _ = self.inner.min_rate.set(rate);
    }

    pub fn min_rate(&self) -> MinRate {
        self.inner.min_rate.get().copied().unwrap_or_default()
    }

    /// The table, also after a panic elsewhere poisoned its lock: every operation on it leaves
    /// the map whole, so its data is good.
    fn running(&self) -> MutexGuard<'_, HashMap<Digest, Arc<FillState>>> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of fills in flight.
    pub fn in_flight(&self) -> usize {
        self.running().len()
    }

    /// The fill of `digest` in flight, if any (what a peer of the region streams from).
    pub fn get(&self, digest: &Digest) -> Option<Arc<FillState>> {
        self.running().get(digest).cloned()
    }

    /// Snapshot of the fills in flight: (digest, progress).
    pub fn snapshot(&self) -> Vec<(Digest, Progress)> {
        self.running()
            .values()
            .map(|s| (s.digest.clone(), s.progress.borrow().clone()))
            .collect()
    }

    /// The fill of `digest` in flight, if any (without joining or starting one).
    pub fn running_fill(&self, digest: &Digest) -> Option<Arc<FillState>> {
        self.running().get(digest).cloned()
    }

    /// Joins the fill of `digest`, or makes the caller its leader: the one that starts it
    /// ([`FillLeader::start`]). A leader dropped before the fill's outcome is set (never started,
    /// or its task panicked or was aborted) fails the fill for every follower at once.
    pub fn join_or_start(&self, digest: &Digest) -> Joined {
        let mut map = self.running();
        if let Some(s) = map.get(digest) {
            self.inner.metrics.fill_joined();
            return Joined::Follower(FillFollower { state: s.clone() });
        }
        let state = Arc::new(FillState {
            digest: digest.clone(),
            progress: watch::Sender::new(Progress::default()),
            spool: OnceLock::new(),
            window: Mutex::new(Window::default()),
            assembly: Arc::new(Assembly::default()),
            wanted: watch::Sender::new(false),
        });
        map.insert(digest.clone(), state.clone());
        Joined::Leader(FillLeader {
            fills: self.clone(),
            state,
            started: false,
        })
    }
}

/// A caller's role in the fill of a digest.
pub enum Joined {
    /// The caller must start the fill (or drop the leader, which fails it).
    Leader(FillLeader),
    /// A fill was already running; the caller reads it.
    Follower(FillFollower),
}

impl Joined {
    /// The fill, whatever the role.
    pub fn state(&self) -> &Arc<FillState> {
        match self {
            Joined::Leader(l) => &l.state,
            Joined::Follower(f) => &f.state,
        }
    }

    /// Starts the fill with `plan()` when the caller leads it (`plan` is called only then);
    /// the fill either way.
    pub fn start_with(self, plan: impl FnOnce() -> FillPlan) -> Arc<FillState> {
        match self {
            Joined::Leader(l) => l.start(plan()),
            Joined::Follower(f) => f.state,
        }
    }
}

/// The fill's owner: it alone sets the outcome and removes the fill from the table. Dropped
/// before the outcome was set, it fails the fill (as a `CacheLock` write permit does), so
/// followers never wait on a fill nobody runs.
pub struct FillLeader {
    fills: Fills,
    state: Arc<FillState>,
    /// The fill task ran (the in-flight gauge counts it).
    started: bool,
}

/// A reader of a fill another caller leads.
pub struct FillFollower {
    state: Arc<FillState>,
}

impl FillLeader {
    /// Runs the fill in a detached task that owns this leader: no client can cancel it.
    pub fn start(mut self, plan: FillPlan) -> Arc<FillState> {
        let state = self.state.clone();
        let span = tracing::info_span!("fill", digest = %state.digest);
        tokio::spawn(
            async move {
                let fills = self.fills.clone();
                fills.inner.metrics.fill_started();
                self.started = true;
                let outcome = run_fill(
                    &self.state,
                    plan,
                    &fills.inner.spool_dir,
                    &fills.inner.metrics,
                    fills.inner.evictor.get(),
                    fills.min_rate(),
                )
                .await;
                self.finish(outcome);
            }
            .instrument(span),
        );
        state
    }

    /// Sets the outcome: the fill leaves the table first, so a request arriving after the
    /// outcome starts a new fill rather than joining a finished one.
    fn finish(&mut self, outcome: Outcome) {
        if std::mem::take(&mut self.started) {
            self.fills.inner.metrics.fill_finished(match outcome {
                Outcome::Done => FillResult::Done,
                Outcome::NotFound => FillResult::NotFound,
                Outcome::Failed(_) => FillResult::Failed,
            });
        }
        {
            let mut map = self.fills.running();
            if map
                .get(&self.state.digest)
                .is_some_and(|s| Arc::ptr_eq(s, &self.state))
            {
                map.remove(&self.state.digest);
            }
        }
        self.state.end(outcome);
    }
}

impl Drop for FillLeader {
    fn drop(&mut self) {
        if self.state.progress.borrow().outcome.is_none() {
            self.finish(Outcome::Failed(Error::transient(
                "fill",
                "the fill's task ended without an outcome",
            )));
        }
    }
}

impl FillState {
    /// Publishes the outcome. Everything is in the spool file by then (or the fill failed), so the
    /// window is let go: readers still going read the file.
    fn end(&self, outcome: Outcome) {
        if let Ok(mut w) = self.window.lock() {
            w.clear();
        }
        self.progress.send_modify(|p| p.outcome = Some(outcome));
    }

    /// The spool file once it holds the whole blob and the digest matched: a reader arriving
    /// then (typically just after the first client, while the fill syncs and commits) is
    /// served from it like a local file, by `sendfile` where the front can.
    pub fn verified_spool(&self) -> Option<Arc<File>> {
        let p = self.progress.borrow();
        let whole = p.verified && p.size == Some(p.written);
        let failed = matches!(p.outcome, Some(Outcome::Failed(_) | Outcome::NotFound));
        if whole && !failed {
            self.spool.get().cloned()
        } else {
            None
        }
    }

    /// A reader wants the fill's bytes: a lazy fill starts now.
    pub fn want(&self) {
        self.wanted
            .send_if_modified(|w| !std::mem::replace(w, true));
    }

    /// A lender for a ranged read of this blob (of `size` bytes, as the read's source said).
    pub fn lender(&self, size: u64) -> super::assembly::Lender {
        self.assembly.lender(size)
    }

    /// Waits until a source answered: `(size, source)`, or the fill's failure.
    pub async fn started(&self) -> Result<(u64, Arc<str>)> {
        self.want();
        let mut rx = self.progress.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                if let (Some(size), Some(src)) = (p.size, &p.source) {
                    return Ok((size, src.clone()));
                }
                match &p.outcome {
                    Some(Outcome::NotFound) => {
                        return Err(Error::client(
                            ErrorCode::BlobUnknown,
                            format!("blob {} is unknown to every engine", self.digest),
                        ))
                    }
                    Some(Outcome::Failed(e)) => return Err(e.clone()),
                    _ => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(Error::transient("fill", "fill ended without an outcome"));
            }
        }
    }

    /// Waits for the fill's outcome: the blob's size once it is verified (and committed, unless
    /// the commit failed), or the failure every reader is answered. A fill always ends: its
    /// sources keep a minimum rate, and a leader that goes away fails it.
    pub async fn finished(&self) -> Result<u64> {
        let mut rx = self.progress.subscribe();
        let ended = || Error::transient("fill", "fill ended without an outcome");
        let p = rx
            .wait_for(|p| p.outcome.is_some())
            .await
            .map_err(|_| ended())?;
        match &p.outcome {
            Some(Outcome::Done) => Ok(p.size.unwrap_or(p.written)),
            Some(Outcome::NotFound) => Err(Error::client(
                ErrorCode::BlobUnknown,
                format!("blob {} is unknown to every engine", self.digest),
            )),
            Some(Outcome::Failed(e)) => Err(e.clone()),
            None => Err(ended()),
        }
    }

    /// Records that the spool file holds `written` bytes, so the window may let go of them.
    fn published(&self, written: u64) {
        // Published before the trim: a reader that misses the window then finds `written` past
        // the bytes it wants.
        self.progress.send_modify(|p| {
            p.written = written;
            p.received = p.received.max(written);
        });
        if let Ok(mut w) = self.window.lock() {
            w.trim(written);
        }
    }

    /// `len` bytes from `offset` as the fill brings them, piece by piece (see [`FillReader`]).
    pub fn follow(self: &Arc<Self>, offset: u64, len: u64) -> FillReader {
        self.want();
        FillReader {
            fill: self.clone(),
            rx: self.progress.subscribe(),
            pos: offset,
            end: offset + len,
            hold_last: true,
        }
    }

    /// [`FillState::follow`] for a range: its last byte is not held back until the verdict (a
    /// range cannot be verified on its own; a failed fill still breaks the reader).
    pub fn follow_range(self: &Arc<Self>, offset: u64, len: u64) -> FillReader {
        FillReader {
            hold_last: false,
            ..self.follow(offset, len)
        }
    }

    /// The progress the fill publishes, to watch.
    pub fn watch(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }
}

/// A reader of one fill ([`FillState::follow`]): its bytes as pieces a sender can take without
/// copying (chunks of the in-memory window, or ranges of the spool file already written, which
/// the plain front sends with `sendfile`), or as a stream ([`FillReader::into_stream`]). The last
/// byte comes only after the digest has been verified; a failed fill is an error.
pub struct FillReader {
    fill: Arc<FillState>,
    rx: watch::Receiver<Progress>,
    pos: u64,
    end: u64,
    /// The last byte waits for the verdict (every whole-blob reader).
    hold_last: bool,
}

/// What a [`FillReader`] has ready.
pub enum Piece {
    Bytes(Bytes),
    /// `len` bytes of the spool `file` at `offset`, all on disk. The reader moves past the range
    /// when it is handed out; a sender that takes less must say so with
    /// [`FillReader::rewind_to`].
    File {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
}

impl FillReader {
    /// The bytes as a stream of chunks (window chunks, or spool reads that start at
    /// [`crate::fileio::FIRST_CHUNK`] and double up to [`crate::fileio::CHUNK`], so a receiver
    /// that takes nothing holds one small read).
    pub fn into_stream(self) -> ByteStream {
        let first = crate::fileio::FIRST_CHUNK;
        let budget = crate::fileio::ReadBudget::current();
        Box::pin(futures::stream::try_unfold(
            (self, first),
            move |(mut r, size)| {
                let budget = budget.clone();
                async move {
                    Ok(match r.next_piece(false).await? {
                        None => None,
                        Some(Piece::Bytes(b)) => Some((b, (r, size))),
                        Some(Piece::File { file, offset, len }) => {
                            let want = len.min(size as u64) as usize;
                            let chunk = budget.read(file, offset, want).await?;
                            if chunk.is_empty() {
                                return Err(Error::transient(
                                    "fill",
                                    "spool shorter than reported",
                                ));
                            }
                            r.rewind_to(offset + chunk.len() as u64);
                            let next = (size * 2).min(crate::fileio::CHUNK);
                            Some((chunk, (r, next)))
                        }
                    })
                }
            },
        ))
    }

    /// The next piece, once there is one; `None` at the end. `prefer_file`: take bytes from the
    /// spool when they are on disk, even if the window still holds them (a sender with
    /// `sendfile` saves a copy that way; one that reads into memory saves a disk read the other).
    pub async fn next_piece(&mut self, prefer_file: bool) -> Result<Option<Piece>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let end = self.end;
        loop {
            let (allowed, on_disk, failed) = {
                let p = self.rx.borrow_and_update();
                let (allowed, failed) = match &p.outcome {
                    // Verified bytes stay good even if the sync or commit fails after.
                    _ if p.verified => (end, None),
                    Some(Outcome::Done) => (end, None),
                    Some(Outcome::NotFound) => {
                        (0, Some(Error::engine("fill", EngineError::NotFound)))
                    }
                    Some(Outcome::Failed(e)) => (0, Some(e.clone())),
                    // Hold the final byte back until the verdict.
                    None if self.hold_last => (p.received.min(end.saturating_sub(1)), None),
                    None => (p.received.min(end), None),
                };
                let on_disk = if p.outcome.is_some() || p.verified {
                    allowed
                } else {
                    p.written.min(allowed)
                };
                (allowed, on_disk, failed)
            };
            if let Some(e) = failed {
                return Err(e);
            }
            let pos = self.pos;
            if pos < allowed {
                let file = self.fill.spool.get().cloned();
                if let (true, Some(file)) = (prefer_file && pos < on_disk, &file) {
                    self.pos = on_disk;
                    return Ok(Some(Piece::File {
                        file: file.clone(),
                        offset: pos,
                        len: on_disk - pos,
                    }));
                }
                let from_window = match self.fill.window.lock() {
                    Ok(w) => w.get(pos, allowed - pos),
                    Err(_) => None,
                };
                if let Some(chunk) = from_window {
                    self.pos = pos + chunk.len() as u64;
                    return Ok(Some(Piece::Bytes(chunk)));
                }
                let file = file.ok_or_else(|| Error::transient("fill", "spool missing"))?;
                // Past the window, the bytes are in the spool file (the window may have moved
                // on since `on_disk` was read: read it again); bytes the fill took lent, never
                // in the window, are there once the write lane has passed them: else wait.
                let on_disk = on_disk.max(self.rx.borrow().written.min(allowed));
                if pos < on_disk {
                    self.pos = on_disk;
                    return Ok(Some(Piece::File {
                        file,
                        offset: pos,
                        len: on_disk - pos,
                    }));
                }
            }
            if self.rx.changed().await.is_err() {
                return Err(Error::transient("fill", "fill task went away"));
            }
        }
    }

    /// Takes back the part of the last [`Piece::File`] not sent: the next piece starts at `pos`.
    pub fn rewind_to(&mut self, pos: u64) {
        self.pos = pos;
    }
}

/// Removes the spool file when the fill is over, whatever happened.
struct SpoolGuard(PathBuf);

impl Drop for SpoolGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The fill task: find a source, copy into the spool while hashing, fail over mid-stream by
/// resuming at the offset reached, verify, commit.
async fn run_fill(
    state: &Arc<FillState>,
    plan: FillPlan,
    spool_dir: &std::path::Path,
    metrics: &Metrics,
    evictor: Option<&Arc<crate::evict::Evictor>>,
    min_rate: MinRate,
) -> Outcome {
    let digest = &state.digest;
    // The spool is there before any source is asked: ranged reads beside the fill may lend their
    // bytes to it from their first one (`assembly.rs`), also while a lazy fill waits.
    let mut spool = match Spool::open(spool_dir, digest) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(e),
    };
    state.assembly.open(spool.writer.clone());
    if plan.lazy {
        let mut wanted = state.wanted.subscribe();
        let _ = tokio::time::timeout(LAZY, wanted.wait_for(|w| *w)).await;
    }
    let mut sources = plan.sources.into_iter();
    // The last engine failure: what the fill reports when no engine could serve.
    let mut last_err: Option<Error> = None;

    // 1. The first engine that has the blob. Any failure moves on to the next engine: one
    // engine's failure, transient or not, says nothing of another's.
    let (mut stream, size, mut engine, mut current_src) = loop {
        let Some((engine, repo)) = sources.next() else {
            return match last_err {
                Some(e) => Outcome::Failed(e),
                None => Outcome::NotFound,
            };
        };
        metrics.engine_request(engine.id());
        match engine.get_blob(&repo, digest, GetBlob::default()).await {
            Ok(Some(read)) => {
                let stream = rate::guard(read.stream, min_rate, engine.id());
                break (stream, read.size, engine, repo);
            }
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(engine = engine.id(), error = %e, transient = e.is_transient(), "fill source failed");
                metrics.upstream_error(engine.id());
                last_err = Some(e);
            }
        }
    };

    if !state.assembly.fix_size(size) {
        // Ranged reads beside the fill were answered with another size: their bytes are not
        // used, and go on into a spool the fill no longer writes.
        tracing::warn!(
            size,
            "ranged reads beside the fill saw another blob size; their bytes are not taken"
        );
        state.assembly.seal();
        spool = match Spool::open(spool_dir, digest) {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(e),
        };
    }
    let (spool_path, writer, reader) = (
        spool.path.clone(),
        spool.writer.clone(),
        spool.reader.clone(),
    );
    let _ = state.spool.set(reader.clone());
    let source_id: Arc<str> = engine.id().into();
    state.progress.send_modify(|p| {
        p.size = Some(size);
        p.source = Some(source_id.clone());
        p.since = Some(tokio::time::Instant::now());
    });
    tracing::info!(source = %source_id, size, "fill started");

    // 2. Copy, hashing as we go; on a failed stream move to the next engine at the same offset.
    let mut sink = SpoolSink::new(writer.clone(), reader, Verifier::new(digest), state.clone());
    // Bytes taken from the network and queued for hashing and writing.
    let mut received: u64 = 0;
    // What the stream said after a batch was cut short (its error or its end), for the next turn.
    let mut held: Option<Option<Result<Bytes>>> = None;
    // The last stream's failure rules out asking its engine again (too slow, or not transient).
    let mut skip_same = false;
    // Bytes the fill's own sources brought, since when: the pace lent bytes are held to.
    let mut own: u64 = 0;
    let streaming = std::time::Instant::now();
    loop {
        // Bytes lent right at the frontier: taken from the spool; then this stream is done, and
        // the source is asked again from the first byte nobody brought.
        if state.assembly.at(received).is_some() {
            let secs = streaming.elapsed().as_secs_f64();
            let own_rate = if own >= 1 << 20 && secs > 0.0 {
                own as f64 / secs
            } else {
                0.0
            };
            if let Err(e) = take_lent(state, &mut sink, &mut received, metrics, own_rate).await {
                return Outcome::Failed(Error::transient("fill", format!("spool failed: {e}")));
            }
            held = None;
            if received == size {
                break;
            }
            if let Some(resumed) = resume(
                std::iter::once((engine.clone(), current_src.clone())).chain(sources.by_ref()),
                digest,
                received,
                size,
                metrics,
                &mut last_err,
            )
            .await
            {
                (stream, engine, current_src) = resumed;
                stream = rate::guard(stream, min_rate, engine.id());
                continue;
            }
            let why = last_err
                .unwrap_or_else(|| Error::transient(engine.id(), "no engine serves the rest"));
            tracing::warn!(error = %why, received, size, "transfer stopped: no engine could go on after lent bytes");
            return Outcome::Failed(why);
        }
        let item = match held.take() {
            Some(item) => item,
            None => stream.next().await,
        };
        let mut end_of_stream = false;
        let mut batch = Vec::new();
        let mut batch_len = 0;
        match item {
            Some(Ok(chunk)) => {
                batch_len += chunk.len();
                batch.push(chunk);
                // Take whatever else is ready now, so a fast network gets large disk writes and a
                // slow one still reaches readers at once.
                while batch_len < WRITE_BATCH {
                    match stream.next().now_or_never() {
                        Some(Some(Ok(c))) => {
                            batch_len += c.len();
                            batch.push(c);
                        }
                        Some(other) => {
                            held = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(engine = engine.id(), offset = received, error = %e, "fill source failed mid-stream");
                metrics.upstream_error(engine.id());
                // Only a transient failure is worth asking the same source again, and not when
                // the source was too slow: the next engine takes over.
                skip_same = !e.is_transient() || rate::TooSlow::is(&e);
                last_err = Some(e);
                end_of_stream = true;
            }
            None => end_of_stream = true,
        }
        batch.retain(|c| !c.is_empty());
        if !batch.is_empty() {
            if received + batch_len as u64 > size {
                return Outcome::Failed(Error::permanent(
                    engine.id(),
                    "sent more bytes than the blob's size",
                ));
            }
            // Up to the first extent lent ahead: the bytes from there are taken from the spool
            // at the next turn, and this stream is done.
            let upto = state.assembly.claim(received, received + batch_len as u64);
            if upto < received + batch_len as u64 {
                batch_len = (upto - received) as usize;
                cut(&mut batch, batch_len);
                held = None;
                if batch.is_empty() {
                    continue;
                }
            }
            metrics.engine_bytes(engine.id(), batch_len as u64);
            // Readers may take the batch from memory at once, before it is hashed or written.
            if let Ok(mut w) = state.window.lock() {
                let mut offset = received;
                for c in &batch {
                    w.push(offset, c.clone());
                    offset += c.len() as u64;
                }
                state.progress.send_modify(|p| p.received = offset);
            }
            received += batch_len as u64;
            own += batch_len as u64;
            // Hashed and written in the background while the next chunks are read.
            if let Err(e) = sink.push(batch).await {
                return Outcome::Failed(Error::transient(
                    "fill",
                    format!("spool write failed: {e}"),
                ));
            }
        }
        if !end_of_stream {
            continue;
        }
        if received == size {
            break;
        }
        // Short or broken stream: resume from `received` (what is queued will be written, or the
        // fill fails) on the next engine that has the blob
        // (the same upstream is retried once first, as most failures are a dropped connection).
        let skip_same = std::mem::take(&mut skip_same);
        let retry_same =
            std::iter::once((engine.clone(), current_src.clone())).filter(move |_| !skip_same);
        let resumed = resume(
            retry_same.chain(sources.by_ref()),
            digest,
            received,
            size,
            metrics,
            &mut last_err,
        )
        .await;
        match resumed {
            Some((s, e, r)) => {
                stream = rate::guard(s, min_rate, e.id());
                engine = e;
                current_src = r;
            }
            None => {
                let why = last_err
                    .unwrap_or_else(|| Error::transient(engine.id(), "the stream ended early"));
                tracing::warn!(error = %why, received, size, "transfer stopped: no engine could resume it");
                return Outcome::Failed(why);
            }
        }
    }

    // 3. Verify, then commit whole.
    state.assembly.seal();
    let verifier = match sink.finish().await {
        Ok((v, written)) if written == size => v,
        Ok((_, written)) => {
            return Outcome::Failed(Error::transient(
                "fill",
                format!("spool holds {written} of {size} bytes"),
            ))
        }
        Err(e) => {
            return Outcome::Failed(Error::transient("fill", format!("spool write failed: {e}")))
        }
    };
    let actual = verifier.finish();
    if &actual != digest {
        tracing::error!(source = %source_id, %actual, "digest mismatch: nothing stored");
        metrics.digest_mismatch(&source_id);
        return Outcome::Failed(Error::DigestMismatch {
            expected: digest.to_string(),
            actual: actual.to_string(),
        });
    }
    // The bytes are right: readers may have their last byte now, before the sync and commit.
    state.progress.send_modify(|p| p.verified = true);
    if let Err(e) = sync_spool(writer).await {
        return Outcome::Failed(Error::transient("fill", format!("spool sync failed: {e}")));
    }
    if let Some((local, repo)) = plan.target {
        let committed = async {
            local.put_blob_file(digest, &spool_path, size).await?;
            local.link_blob(&repo, digest).await
        }
        .await;
        match committed {
            Ok(()) => {
                tracing::info!(size, "fill committed");
                if let Some(e) = evictor {
                    e.touch(digest, size, Some(true));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "fill verified but not committed to the local engine")
            }
        }
    }
    Outcome::Done
}

/// The blob from byte `from` on from the first of `engines` that serves exactly that: the
/// stream, the engine and the repository it knows the blob under.
async fn resume(
    engines: impl Iterator<Item = (Arc<dyn Engine>, RepoName)>,
    digest: &Digest,
    from: u64,
    size: u64,
    metrics: &Metrics,
    last_err: &mut Option<Error>,
) -> Option<(ByteStream, Arc<dyn Engine>, RepoName)> {
    for (e, repo) in engines {
        let opts = GetBlob {
            range: Some(ByteRange {
                start: from,
                end: None,
            }),
        };
        metrics.engine_request(e.id());
        match e.get_blob(&repo, digest, opts).await {
            Ok(Some(read)) if read.size == size && read.offset == from => {
                tracing::info!(engine = e.id(), offset = from, "fill resumed");
                return Some((read.stream, e, repo));
            }
            Ok(_) => continue,
            Err(err) => {
                metrics.upstream_error(e.id());
                *last_err = Some(err);
            }
        }
    }
    None
}

/// How often the fill judges the pace of an extent it follows.
const FOLLOW_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Takes the bytes lent at `*received` (see `assembly.rs`): hashed from the spool in order, the
/// extent followed while its ranged read brings more at least half as fast as the fill's own
/// source did (`own_rate`, bytes/s; 0 when not known: then until it stalls for [`STALL`]), then
/// the next extent if one starts where it ends. A slower extent is closed: a ranged read goes at
/// its client's pace, which must not become the fill's. `*received` ends at the first byte not
/// lent.
async fn take_lent(
    state: &FillState,
    sink: &mut SpoolSink,
    received: &mut u64,
    metrics: &Metrics,
    own_rate: f64,
) -> std::io::Result<()> {
    let a = &state.assembly;
    let mut changed = a.watch();
    let mut start = *received;
    // Where and when the pace of the extent followed was last judged.
    let mut mark = (std::time::Instant::now(), *received);
    while let Some(v) = a.at(start) {
        if v.end > *received {
            let len = v.end - *received;
            sink.push_lent(*received, len).await?;
            metrics.fill_lent_bytes(len);
            *received = v.end;
        }
        if v.open {
            let elapsed = mark.0.elapsed();
            let slow = elapsed >= FOLLOW_TICK
                && ((v.end - mark.1) as f64) < own_rate / 2.0 * elapsed.as_secs_f64();
            if slow || v.grew.elapsed() >= STALL {
                tracing::debug!(at = v.end, slow, "the fill stops following a lending range");
                // It grows no more; what it reserved is still waited for.
                a.close(start);
                continue;
            }
            if elapsed >= FOLLOW_TICK {
                mark = (std::time::Instant::now(), v.end);
            }
            a.changed(&mut changed, FOLLOW_TICK).await;
            continue;
        }
        if v.pending > v.end {
            a.changed(&mut changed, STALL).await;
            continue;
        }
        a.absorb(start, *received);
        start = *received;
    }
    Ok(())
}

/// Keeps the first `len` bytes of `batch`.
fn cut(batch: &mut Vec<Bytes>, len: usize) {
    let mut left = len;
    batch.retain_mut(|c| {
        if left == 0 {
            return false;
        }
        if c.len() > left {
            c.truncate(left);
        }
        left -= c.len();
        true
    });
}

/// A spool file, removed when dropped (whatever happened).
struct Spool {
    path: PathBuf,
    writer: Arc<File>,
    /// Readers `pread` it; it stays valid after the file is renamed, linked or unlinked.
    reader: Arc<File>,
    _guard: SpoolGuard,
}

impl Spool {
    fn open(dir: &std::path::Path, digest: &Digest) -> std::result::Result<Spool, Error> {
        let path = dir.join(format!("{}.{}.part", digest.hex(), rand::random::<u64>()));
        let guard = SpoolGuard(path.clone());
        let (w, r) = open_spool(&path).map_err(|e| {
            Error::transient(
                "fill",
                format!("cannot create spool {}: {e}", path.display()),
            )
        })?;
        Ok(Spool {
            path,
            writer: Arc::new(w),
            reader: Arc::new(r),
            _guard: guard,
        })
    }
}

fn open_spool(path: &std::path::Path) -> std::io::Result<(File, File)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let w = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let r = File::open(path)?;
    Ok((w, r))
}

/// Batches queued per lane of a [`SpoolSink`]: the network runs this far ahead of the slower of
/// hashing and writing, and no further (memory stays bounded).
const LANE_DEPTH: usize = 4;

/// What the lanes of a [`SpoolSink`] are given, in blob order.
#[derive(Clone)]
enum Part {
    /// The network's own chunks, to hash and write.
    Bytes(Arc<[Bytes]>),
    /// Bytes lent by ranged reads, already in the spool at `offset`: to hash (read back from
    /// the spool) and to count as written.
    Lent { offset: u64, len: u64 },
}

/// The spool writer: hashing and writing are two lanes, each a task that runs its batches on a
/// blocking thread in order, so neither waits for the other, and the network reads go on while
/// they work; the slowest of the three sets the pace, not their sum. A batch is the network's own
/// chunks: nothing is copied.
struct SpoolSink {
    hash_tx: tokio::sync::mpsc::Sender<Part>,
    write_tx: tokio::sync::mpsc::Sender<Part>,
    hashing: tokio::task::JoinHandle<std::io::Result<Verifier>>,
    writing: tokio::task::JoinHandle<std::io::Result<u64>>,
}

impl SpoolSink {
    /// The write lane reports each batch on disk to `state` (readers and the window follow it).
    /// `reader` reads lent bytes back for hashing.
    fn new(
        file: Arc<File>,
        reader: Arc<File>,
        verifier: Verifier,
        state: Arc<FillState>,
    ) -> SpoolSink {
        let (hash_tx, hash_rx) = tokio::sync::mpsc::channel(LANE_DEPTH);
        let (write_tx, write_rx) = tokio::sync::mpsc::channel(LANE_DEPTH);
        SpoolSink {
            hash_tx,
            write_tx,
            hashing: tokio::spawn(hash_lane(hash_rx, reader, verifier)),
            writing: tokio::spawn(write_lane(write_rx, file, state)),
        }
    }

    /// Queues `batch` on both lanes, waiting while either is [`LANE_DEPTH`] batches behind.
    async fn push(&mut self, batch: Vec<Bytes>) -> std::io::Result<()> {
        self.send(Part::Bytes(batch.into())).await
    }

    /// Queues `len` bytes lent at `offset` (already in the spool).
    async fn push_lent(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.send(Part::Lent { offset, len }).await
    }

    async fn send(&mut self, part: Part) -> std::io::Result<()> {
        let hashed = self.hash_tx.send(part.clone()).await.is_ok();
        let written = self.write_tx.send(part).await.is_ok();
        if hashed && written {
            return Ok(());
        }
        // A lane stopped: only its error says why.
        let stopped = if written {
            (&mut self.hashing).await.map(|r| r.map(|_| ()))
        } else {
            (&mut self.writing).await.map(|r| r.map(|_| ()))
        };
        match stopped {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Err(std::io::Error::other("spool lane ended early")),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Waits for both lanes: the hash state and the bytes in the spool file.
    async fn finish(self) -> std::io::Result<(Verifier, u64)> {
        let SpoolSink {
            hash_tx,
            write_tx,
            hashing,
            writing,
        } = self;
        drop((hash_tx, write_tx));
        let written = writing.await.map_err(std::io::Error::other)??;
        let verifier = hashing.await.map_err(std::io::Error::other)??;
        Ok((verifier, written))
    }
}

/// Everything queued right now, as one blocking call's work (fewer thread hand-offs when a lane
/// is behind).
fn take_ready(rx: &mut tokio::sync::mpsc::Receiver<Part>, first: Part) -> Vec<Part> {
    let mut batches = vec![first];
    while let Ok(b) = rx.try_recv() {
        batches.push(b);
    }
    batches
}

/// Lent bytes are read back from the spool for hashing this much at a time.
const READ_BACK: usize = 1 << 20;

async fn hash_lane(
    mut rx: tokio::sync::mpsc::Receiver<Part>,
    reader: Arc<File>,
    mut v: Verifier,
) -> std::io::Result<Verifier> {
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        let parts = take_ready(&mut rx, first);
        let reader = reader.clone();
        let mut b = std::mem::take(&mut buf);
        (v, buf) = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            for part in &parts {
                match part {
                    Part::Bytes(batch) => batch.iter().for_each(|c| v.update(c)),
                    Part::Lent { offset, len } => {
                        let (mut at, end) = (*offset, offset + len);
                        while at < end {
                            let n = ((end - at) as usize).min(READ_BACK);
                            b.resize(n, 0);
                            reader.read_exact_at(&mut b, at)?;
                            v.update(&b);
                            at += n as u64;
                        }
                    }
                }
            }
            Ok::<_, std::io::Error>((v, b))
        })
        .await
        .map_err(std::io::Error::other)??;
    }
    Ok(v)
}

async fn write_lane(
    mut rx: tokio::sync::mpsc::Receiver<Part>,
    file: Arc<File>,
    state: Arc<FillState>,
) -> std::io::Result<u64> {
    let mut written = 0;
    while let Some(first) = rx.recv().await {
        let batches = take_ready(&mut rx, first);
        let file = file.clone();
        written = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut at = written;
            for part in &batches {
                match part {
                    Part::Bytes(batch) => {
                        for c in batch.iter() {
                            file.write_all_at(c, at)?;
                            at += c.len() as u64;
                        }
                    }
                    // Already there: the lender wrote it.
                    Part::Lent { offset, len } if *offset == at => at += len,
                    Part::Lent { offset, .. } => {
                        return Err(std::io::Error::other(format!(
                            "lent bytes at {offset} queued at {at}"
                        )))
                    }
                }
            }
            Ok::<_, std::io::Error>(at)
        })
        .await
        .map_err(std::io::Error::other)??;
        state.published(written);
    }
    Ok(written)
}

async fn sync_spool(file: Arc<File>) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || file.sync_data())
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize, b: u8) -> Bytes {
        Bytes::from(vec![b; n])
    }

    #[test]
    fn window_serves_slices_and_keeps_what_is_not_on_disk() {
        let mut w = Window::default();
        let mib = 1 << 20;
        for i in 0..8u8 {
            w.push(u64::from(i) * mib as u64, chunk(mib, i));
        }
        // Inside a chunk, capped by the chunk's end and by `want`.
        let got = w.get(mib as u64 + 10, 100).unwrap();
        assert_eq!((got.len(), got[0]), (100, 1));
        let got = w.get(2 * mib as u64 - 5, 1000).unwrap();
        assert_eq!((got.len(), got[0]), (5, 1));
        assert!(w.get(8 * mib as u64, 1).is_none());
        // Nothing on disk yet: nothing may go.
        w.trim(0);
        assert_eq!(w.bytes, 8 * mib);
        // All on disk: down to the window size, the oldest first.
        w.trim(8 * mib as u64);
        assert_eq!(w.bytes, WINDOW);
        assert!(w.get(0, 1).is_none());
        assert_eq!(w.get(7 * mib as u64, 1).unwrap()[0], 7);
        w.clear();
        assert!(w.get(7 * mib as u64, 1).is_none());
    }

    /// A fill of 100 bytes: 60 on disk, 80 received (40..80 in the window).
    fn fill_at(written: u64, received: u64) -> (Arc<FillState>, tempfile::NamedTempFile) {
        use std::io::Write;
        let mut spool = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        spool.write_all(&data[..written as usize]).unwrap();
        let state = Arc::new(FillState {
            digest: Digest::sha256_of(&data),
            progress: watch::Sender::new(Progress {
                size: Some(100),
                written,
                received,
                ..Progress::default()
            }),
            spool: OnceLock::new(),
            window: Mutex::new(Window::default()),
            assembly: Arc::new(Assembly::default()),
            wanted: watch::Sender::new(false),
        });
        let _ = state.spool.set(Arc::new(File::open(spool.path()).unwrap()));
        state
            .window
            .lock()
            .unwrap()
            .push(40, Bytes::copy_from_slice(&data[40..received as usize]));
        (state, spool)
    }

    fn range(p: &Piece) -> (u64, u64, bool) {
        match p {
            Piece::Bytes(b) => (u64::from(b[0]), b.len() as u64, false),
            Piece::File { offset, len, .. } => (*offset, *len, true),
        }
    }

    /// An engine holding one blob, sending it in 1 KiB chunks `every` apart (from the range's
    /// start); records the offsets it was asked from.
    #[derive(Debug)]
    struct Source {
        id: &'static str,
        data: Bytes,
        every: std::time::Duration,
        asked: Mutex<Vec<u64>>,
    }

    #[async_trait::async_trait]
    impl Engine for Source {
        fn id(&self) -> &str {
            self.id
        }
        fn kind(&self) -> crate::engine::EngineKind {
            crate::engine::EngineKind::Registry
        }
        async fn open_blob(
            &self,
            _: &RepoName,
            _: &Digest,
            want: crate::engine::Lookup,
        ) -> Result<Option<crate::engine::BlobHit>> {
            if !want.body {
                return Ok(None);
            }
            let start = match want.range {
                Some(crate::engine::RangeSpec::From { start, .. }) => start,
                _ => 0,
            };
            self.asked.lock().unwrap().push(start);
            let rest = self.data.slice(start as usize..);
            let every = self.every;
            let chunks: Vec<Bytes> = rest.chunks(1024).map(Bytes::copy_from_slice).collect();
            // A source with no delay yields at once: a timer per chunk would make its rate the
            // timer's, which a loaded machine can push under the minimum rate.
            let stream = futures::stream::iter(chunks).then(move |c| async move {
                if !every.is_zero() {
                    tokio::time::sleep(every).await;
                }
                Ok(c)
            });
            Ok(Some(crate::engine::BlobHit {
                size: self.data.len() as u64,
                range: (start > 0).then_some(crate::engine::ByteRange { start, end: None }),
                body: Some(crate::engine::Hit::Stream(Box::pin(stream))),
            }))
        }
        async fn get_manifest(
            &self,
            _: &RepoName,
            _: &crate::oci::Reference,
            _: &[String],
        ) -> Result<Option<crate::engine::Manifest>> {
            Ok(None)
        }
        async fn head_manifest(
            &self,
            _: &RepoName,
            _: &crate::oci::Reference,
            _: &[String],
        ) -> Result<Option<crate::engine::ManifestMeta>> {
            Ok(None)
        }
        async fn list_tags(&self, _: &RepoName) -> Result<Option<Vec<String>>> {
            Ok(None)
        }
        async fn probe(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A loopback upstream answering every request with `status`; counts the requests.
    async fn hostile_upstream(status: u16) -> (Arc<dyn Engine>, Arc<std::sync::atomic::AtomicU32>) {
        use std::sync::atomic::{AtomicU32, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(AtomicU32::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let answer = format!(
                        "HTTP/1.1 {status} Hostile\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        let client = crate::engine::registry::client::RegistryClient::new(
            "hostile",
            format!("http://127.0.0.1:{port}").parse().unwrap(),
            reqwest::Client::new(),
            None,
        );
        let engine = crate::engine::registry::RegistryEngine::new(client);
        (Arc::new(engine), asked)
    }

    async fn outcome(state: &Arc<FillState>) -> Option<Outcome> {
        let mut rx = state.progress.subscribe();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            rx.wait_for(|p| p.outcome.is_some()),
        )
        .await
        .expect("the fill ended")
        .unwrap()
        .outcome
        .clone();
        ended
    }

    /// An upstream answering 503 is a transient failure: the fill moves on to the next engine,
    /// which has the blob.
    #[tokio::test]
    async fn a_transient_failure_moves_the_fill_to_the_next_engine() {
        let data = Bytes::from(vec![7u8; 10_000]);
        let digest = Digest::sha256_of(&data);
        let (hostile, asked) = hostile_upstream(503).await;
        let second = Arc::new(Source {
            id: "second",
            data: data.clone(),
            every: std::time::Duration::ZERO,
            asked: Mutex::default(),
        });
        let dir = tempfile::tempdir().unwrap();
        let fills = Fills::new(dir.path().to_path_buf(), Metrics::new());
        let repo: RepoName = "a/b".parse().unwrap();
        let state = fills.join_or_start(&digest).start_with(|| FillPlan {
            sources: vec![
                (hostile, repo.clone()),
                (second.clone() as Arc<dyn Engine>, repo.clone()),
            ],
            target: None,
            lazy: false,
        });
        let (size, source) = state.started().await.unwrap();
        assert_eq!((size, &*source), (10_000, "second"));
        let outcome = outcome(&state).await;
        assert!(matches!(outcome, Some(Outcome::Done)), "{outcome:?}");
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(*second.asked.lock().unwrap(), vec![0]);
    }

    /// When no engine can serve, the fill reports the error with its kind, not a string: an
    /// upstream's refusal reaches the client as `DENIED`, a 5xx as `UNAVAILABLE`.
    #[tokio::test]
    async fn a_failed_fill_reports_the_kind_of_its_failure() {
        for (status, code) in [(403, ErrorCode::Denied), (503, ErrorCode::Unavailable)] {
            let digest = Digest::sha256_of(format!("{status}").as_bytes());
            let (hostile, _) = hostile_upstream(status).await;
            let dir = tempfile::tempdir().unwrap();
            let fills = Fills::new(dir.path().to_path_buf(), Metrics::new());
            let state = fills.join_or_start(&digest).start_with(|| FillPlan {
                sources: vec![(hostile, "a/b".parse().unwrap())],
                target: None,
                lazy: false,
            });
            let err = state.started().await.expect_err("the fill failed");
            assert_eq!(err.to_oci().code, code, "{status}: {err}");
            let transient = status == 503;
            assert_eq!(err.is_transient(), transient, "{status}: {err}");
        }
    }

    /// A source whose stream breaks at `at` with `kind`, and serves ranged reads whole.
    #[derive(Debug)]
    struct Breaks {
        data: Bytes,
        at: usize,
        kind: fn() -> EngineError,
        asked: Mutex<Vec<u64>>,
    }

    #[async_trait::async_trait]
    impl Engine for Breaks {
        fn id(&self) -> &str {
            "breaks"
        }
        fn kind(&self) -> crate::engine::EngineKind {
            crate::engine::EngineKind::Registry
        }
        async fn open_blob(
            &self,
            _: &RepoName,
            _: &Digest,
            want: crate::engine::Lookup,
        ) -> Result<Option<crate::engine::BlobHit>> {
            if !want.body {
                return Ok(None);
            }
            let start = want.start();
            self.asked.lock().unwrap().push(start);
            let rest = self.data.slice(start as usize..);
            let items: Vec<Result<Bytes>> = if start == 0 {
                vec![
                    Ok(self.data.slice(..self.at)),
                    Err(Error::engine("breaks", (self.kind)())),
                ]
            } else {
                vec![Ok(rest.clone())]
            };
            Ok(Some(crate::engine::BlobHit::streamed(
                crate::engine::BlobRead {
                    size: self.data.len() as u64,
                    offset: start,
                    len: rest.len() as u64,
                    stream: Box::pin(futures::stream::iter(items)),
                },
            )))
        }
        async fn get_manifest(
            &self,
            _: &RepoName,
            _: &crate::oci::Reference,
            _: &[String],
        ) -> Result<Option<crate::engine::Manifest>> {
            Ok(None)
        }
        async fn head_manifest(
            &self,
            _: &RepoName,
            _: &crate::oci::Reference,
            _: &[String],
        ) -> Result<Option<crate::engine::ManifestMeta>> {
            Ok(None)
        }
        async fn list_tags(&self, _: &RepoName) -> Result<Option<Vec<String>>> {
            Ok(None)
        }
        async fn probe(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A stream broken by a transient failure is resumed on the same engine first; one broken
    /// by a permanent failure is not asked again: the next engine resumes it.
    #[tokio::test]
    async fn only_a_transient_break_is_resumed_on_the_same_engine() {
        let data = Bytes::from((0..50_000u32).map(|i| (i % 249) as u8).collect::<Vec<u8>>());
        let digest = Digest::sha256_of(&data);
        // (the break, offsets asked of the breaking engine, offsets asked of the next one)
        type Case = (fn() -> EngineError, Vec<u64>, Vec<u64>);
        let cases: [Case; 2] = [
            (
                || EngineError::transient("connection reset"),
                vec![0, 20_000],
                vec![],
            ),
            (
                || EngineError::permanent("protocol violation"),
                vec![0],
                vec![20_000],
            ),
        ];
        for (kind, same, next) in cases {
            let breaks = Arc::new(Breaks {
                data: data.clone(),
                at: 20_000,
                kind,
                asked: Mutex::default(),
            });
            let other = Arc::new(Source {
                id: "other",
                data: data.clone(),
                every: std::time::Duration::ZERO,
                asked: Mutex::default(),
            });
            let dir = tempfile::tempdir().unwrap();
            let fills = Fills::new(dir.path().to_path_buf(), Metrics::new());
            let repo: RepoName = "a/b".parse().unwrap();
            let state = fills.join_or_start(&digest).start_with(|| FillPlan {
                sources: vec![
                    (breaks.clone() as Arc<dyn Engine>, repo.clone()),
                    (other.clone() as Arc<dyn Engine>, repo.clone()),
                ],
                target: None,
                lazy: false,
            });
            let outcome = outcome(&state).await;
            assert!(matches!(outcome, Some(Outcome::Done)), "{outcome:?}");
            assert_eq!(*breaks.asked.lock().unwrap(), same);
            assert_eq!(*other.asked.lock().unwrap(), next);
        }
    }

    /// A source that trickles is left for the next engine, which resumes at the byte reached
    /// (the trickler is not asked again).
    #[tokio::test]
    async fn a_trickling_source_is_replaced_at_the_byte_reached() {
        let data = Bytes::from(
            (0..200_000u32)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        let digest = Digest::sha256_of(&data);
        let slow = Arc::new(Source {
            id: "slow",
            data: data.clone(),
            every: std::time::Duration::from_millis(100),
            asked: Mutex::default(),
        });
        let fast = Arc::new(Source {
            id: "fast",
            data: data.clone(),
            every: std::time::Duration::ZERO,
            asked: Mutex::default(),
        });
        let dir = tempfile::tempdir().unwrap();
        let fills = Fills::new(dir.path().to_path_buf(), Metrics::new());
        fills.set_min_rate(MinRate {
            bytes: 16 << 10,
            window: std::time::Duration::from_millis(500),
        });
        let repo: RepoName = "a/b".parse().unwrap();
        let state = fills.join_or_start(&digest).start_with(|| FillPlan {
            sources: vec![
                (slow.clone() as Arc<dyn Engine>, repo.clone()),
                (fast.clone() as Arc<dyn Engine>, repo.clone()),
            ],
            target: None,
            lazy: false,
        });
        let mut rx = state.progress.subscribe();
        let outcome = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            rx.wait_for(|p| p.outcome.is_some()),
        )
        .await
        .expect("the fill ended")
        .unwrap()
        .outcome
        .clone();
        assert!(matches!(outcome, Some(Outcome::Done)), "{outcome:?}");
        assert_eq!(
            *slow.asked.lock().unwrap(),
            vec![0],
            "the trickler was asked again"
        );
        let resumed = fast.asked.lock().unwrap().clone();
        assert_eq!(resumed.len(), 1);
        assert!(resumed[0] > 0 && resumed[0] < 20_000, "{resumed:?}");
    }

    /// A source whose `get_blob` never answers, or panics.
    #[derive(Debug)]
    struct Stuck {
        panic: bool,
    }

    #[async_trait::async_trait]
    impl Engine for Stuck {
        fn id(&self) -> &str {
            "stuck"
        }
        fn kind(&self) -> crate::engine::EngineKind {
            crate::engine::EngineKind::Registry
        }
        async fn open_blob(
            &self,
            _: &RepoName,
            _: &Digest,
            want: crate::engine::Lookup,
        ) -> Result<Option<crate::engine::BlobHit>> {
            if !want.body {
                return Ok(None);
            }
            if self.panic {
                panic!("a bug in an engine");
            }
            std::future::pending().await
        }
        async fn get_manifest(
            &self,
            _: &RepoName,
            _: &crate::oci::Reference,
            _: &[String],
        ) -> Result<Option<crate::engine::Manifest>> {
            Ok(None)
        }
        async fn head_manifest(
            &self,
            _: &RepoName,
            _: &crate::oci::Reference,
            _: &[String],
        ) -> Result<Option<crate::engine::ManifestMeta>> {
            Ok(None)
        }
        async fn list_tags(&self, _: &RepoName) -> Result<Option<Vec<String>>> {
            Ok(None)
        }
        async fn probe(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A follower of the fill of `digest` sees it fail within a few seconds, and the table
    /// forgets the dead fill: the next request leads a new one.
    async fn follower_fails(fills: &Fills, digest: &Digest, follower: Arc<FillState>) {
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), follower.started());
        let res = waited.await.expect("the follower waits forever");
        assert!(res.is_err(), "the follower was not told the fill failed");
        assert!(matches!(fills.join_or_start(digest), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn dropping_a_leader_fails_the_fill_for_its_followers() {
        let dir = tempfile::tempdir().unwrap();
        let fills = Fills::new(dir.path().to_path_buf(), Metrics::new());
        let digest = Digest::sha256_of(b"x");
        let repo: RepoName = "a/b".parse().unwrap();

        // A leader that never starts.
        let leader = fills.join_or_start(&digest);
        assert!(matches!(leader, Joined::Leader(_)));
        let follower = fills.join_or_start(&digest);
        assert!(Arc::ptr_eq(leader.state(), follower.state()));
        let waiting = tokio::spawn({
            let state = follower.state().clone();
            async move { state.started().await.map(|_| ()) }
        });
        drop(leader);
        let res = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the follower waits forever")
            .unwrap();
        assert!(res.is_err());
        assert_eq!(fills.in_flight(), 0);

        // A leader whose task panics.
        let plan = || FillPlan {
            sources: vec![(
                Arc::new(Stuck { panic: true }) as Arc<dyn Engine>,
                repo.clone(),
            )],
            target: None,
            lazy: false,
        };
        let _fill = fills.join_or_start(&digest).start_with(plan);
        let Joined::Follower(f) = fills.join_or_start(&digest) else {
            panic!("the fill is not running");
        };
        follower_fails(&fills, &digest, f.state.clone()).await;
    }

    #[tokio::test]
    async fn a_leaders_task_dropped_with_its_runtime_fails_the_fill_for_its_followers() {
        let dir = tempfile::tempdir().unwrap();
        let fills = Fills::new(dir.path().to_path_buf(), Metrics::new());
        let digest = Digest::sha256_of(b"y");
        // The fill task runs on a runtime that shuts down with it stuck in its source: the
        // task is dropped, its leader with it.
        let follower = std::thread::spawn({
            let fills = fills.clone();
            let digest = digest.clone();
            move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let _fill = fills.join_or_start(&digest).start_with(|| FillPlan {
                        sources: vec![(
                            Arc::new(Stuck { panic: false }) as Arc<dyn Engine>,
                            "a/b".parse().unwrap(),
                        )],
                        target: None,
                        lazy: false,
                    });
                    tokio::task::yield_now().await;
                    fills.join_or_start(&digest).state().clone()
                })
            }
        })
        .join()
        .unwrap();
        follower_fails(&fills, &digest, follower).await;
    }

    #[tokio::test]
    async fn a_sendfile_reader_takes_what_is_on_disk_and_the_last_byte_after_the_verdict() {
        let (fill, _spool) = fill_at(60, 80);
        let mut r = fill.follow(0, 100);
        // On disk: one file range; past it, the window's bytes.
        let p = r.next_piece(true).await.unwrap().unwrap();
        assert_eq!(range(&p), (0, 60, true));
        let p = r.next_piece(true).await.unwrap().unwrap();
        assert_eq!(range(&p), (60, 20, false));
        // All there but not verified: everything but the last byte.
        fill.progress.send_modify(|p| {
            p.written = 100;
            p.received = 100;
        });
        let p = r.next_piece(true).await.unwrap().unwrap();
        assert_eq!(range(&p), (80, 19, true));
        let p = {
            let waiting = r.next_piece(true);
            tokio::pin!(waiting);
            assert!(futures::poll!(waiting.as_mut()).is_pending());
            fill.progress.send_modify(|p| p.verified = true);
            waiting.await.unwrap().unwrap()
        };
        assert_eq!(range(&p), (99, 1, true));
        assert!(r.next_piece(true).await.unwrap().is_none());

        // A memory reader prefers the window; a failed fill is an error, not an end.
        let (fill, _spool) = fill_at(60, 80);
        let mut r = fill.follow(50, 50);
        let p = r.next_piece(false).await.unwrap().unwrap();
        assert_eq!(range(&p), (50, 30, false));
        fill.progress.send_modify(|p| {
            p.outcome = Some(Outcome::Failed(Error::DigestMismatch {
                expected: "a".into(),
                actual: "b".into(),
            }))
        });
        assert!(r.next_piece(false).await.is_err());
    }
}
