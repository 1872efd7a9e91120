//! Ranges of cold blobs, answered at once rather than after the whole blob.
//!
//! A `Range` the local engine cannot serve joins (or starts, with `cache.fill_on_range`) the one
//! whole-blob fill of the digest, then is served by whichever is sooner:
//!
//! * the fill: bytes it has already received are read from its window or spool, and a range a
//!   little ahead of it (what the fill brings, at its rate so far, in about the time a ranged
//!   read takes to start) waits for it;
//! * a ranged `GET` of just those bytes from the nearest engine that has the blob (the fill's
//!   sources, in the fill's order), streamed to the client. When the fill reaches the range first
//!   (before the ranged read answered, or by overtaking it mid-way), the response continues
//!   from the fill and the ranged read is dropped; when the ranged read fails, from the fill too.
//!
//! A range cannot be verified on its own (no registry does), so a ranged response does not wait
//! for the fill's verdict; but a verdict that is a digest mismatch breaks every ranged response
//! of the digest still in flight (its body ends with an error, never cleanly), counted in
//! `ociedge_range_responses_broken_total`. Nothing unverified is committed: only the fill commits,
//! as before. Bytes of ranged reads are counted in `ociedge_range_fetch_bytes_total`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use super::assembly::{Lender, LEND_MIN};
use super::blob::{BlobAnswer, BlobBody};
use super::fill::{FillPlan, FillState, Fills, Outcome, Progress};
use super::rate::{self, MinRate};
use super::{Puller, RangeSpec};
use crate::engine::set::Routed;
use crate::engine::{ByteRange, ByteStream, Engine, Hit, Lookup};
use crate::error::{EngineError, Error, Result};
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};

/// A range starting at most this far past what the fill has received waits for the fill when
/// the fill's rate is not known yet.
const AHEAD: u64 = 4 << 20;

/// About the time a ranged read takes to bring its first byte: a range the fill reaches sooner
/// (at its rate so far) waits for the fill.
const FETCH_LATENCY: Duration = Duration::from_millis(20);

/// Bounds of the distance ahead of the fill that is waited for, whatever its rate.
const AHEAD_MIN: u64 = 1 << 20;
const AHEAD_MAX: u64 = 8 << 20;

/// A ranged read in flight is dropped for the fill once the fill holds this much past it.
const OVERTAKE: u64 = 1 << 20;

/// The engines a ranged read asks, in the fill's order.
type Sources = Vec<(Arc<dyn Engine>, RepoName)>;

impl Puller {
    /// A range of a blob the local engine does not have (a `GET`: `HEAD`s never come here).
    pub(super) async fn cold_range(
        &self,
        r: &Routed,
        digest: &Digest,
        spec: RangeSpec,
        local_ok: bool,
    ) -> Result<BlobAnswer> {
        let sources = self.engines.remotes_for(r);
        let fill = if self.fill_on_range {
            // The whole-blob fill a client's GET would start (in a region: led by the lease).
            let joined = self.fills.join_or_start(digest);
            let state = joined.state().clone();
            // A range far into the blob goes first: its fill starts once the range's own read is
            // over (or a reader wants the start of the blob), see `FillPlan::lazy`.
            let far = match spec {
                RangeSpec::From { start, .. } => start > AHEAD,
                RangeSpec::Suffix(_) => true,
            };
            Some(joined.start_with(|| FillPlan {
                sources: self.fill_sources(r, &state, local_ok),
                target: local_ok.then(|| (self.engines.local().clone(), r.storage_repo.clone())),
                lazy: far,
            }))
        } else {
            // Only the ranges are fetched; a fill another request started is still used.
            self.fills.running_fill(digest)
        };
        let fetch = RangeFetch {
            sources: Arc::new(sources),
            digest: digest.clone(),
            metrics: self.metrics.clone(),
            min_rate: self.fills.min_rate(),
            fills: self.fills.clone(),
        };
        let Some(fill) = fill.filter(|f| usable(&f.watch().borrow())) else {
            let read = fetch.open(spec, None).await?;
            let range = read.range;
            return Ok(fetch.answer(read, None, range));
        };
        let p = fill.watch().borrow().clone();
        match (p.size, spec) {
            (Some(size), _) => {
                let range = spec.resolve(size)?;
                if let Some(file) = fill.verified_spool() {
                    let (offset, len) = span(range, size);
                    return Ok(BlobAnswer {
                        size,
                        range: Some(range),
                        source: p.source.clone().unwrap_or_else(|| self.local_name.clone()),
                        body: Some(BlobBody::File(crate::fileio::FileSlice {
                            file,
                            offset,
                            len,
                            keep: None,
                        })),
                        redirect: None,
                    });
                }
                if range.start <= p.received.saturating_add(ahead(&p)) {
                    return self.follow(&fetch, &fill, range, size).await;
                }
            }
            (None, RangeSpec::From { start, .. }) if start <= AHEAD => {
                let (size, _) = fill.started().await?;
                let range = spec.resolve(size)?;
                return self.follow(&fetch, &fill, range, size).await;
            }
            (None, _) => {}
        }
        // Far ahead of the fill: a ranged read, unless the fill reaches the range first.
        let reach = match (p.size, spec) {
            (Some(size), _) => Some(spec.resolve(size)?.start),
            (None, RangeSpec::From { start, .. }) => Some(start),
            (None, RangeSpec::Suffix(_)) => None,
        };
        let opened = {
            let open = fetch.open(spec, p.size);
            tokio::pin!(open);
            match reach {
                Some(start) => {
                    let mut rx = fill.watch();
                    tokio::select! {
                        read = &mut open => Some(read),
                        // (an error here: the fill failed; then the ranged read decides)
                        reached = reaches(&mut rx, start) => {
                            if reached {
                                None
                            } else {
                                Some(open.await)
                            }
                        }
                    }
                }
                None => Some(open.await),
            }
        };
        match opened {
            Some(Ok(read)) => {
                let range = read.range;
                Ok(fetch.answer(read, Some(fill), range))
            }
            Some(Err(e)) if is_range_invalid(&e) => Err(e),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ranged read failed; the range follows the fill");
                let (size, _) = fill.started().await?;
                self.follow(&fetch, &fill, spec.resolve(size)?, size).await
            }
            None => {
                let (size, _) = fill.started().await?;
                self.follow(&fetch, &fill, spec.resolve(size)?, size).await
            }
        }
    }

    /// The range from the fill (its last byte not held back for the verdict).
    async fn follow(
        &self,
        fetch: &RangeFetch,
        fill: &Arc<FillState>,
        range: ByteRange,
        size: u64,
    ) -> Result<BlobAnswer> {
        let (_, source) = fill.started().await?;
        let (offset, len) = span(range, size);
        let body = RangeBody {
            pos: offset,
            end: offset + len,
            size,
            rx: Some(fill.watch()),
            src: Src::Fill(fill.follow_range(offset, len).into_stream()),
            fill: Some(fill.clone()),
            fetch: fetch.clone(),
            fell_back: false,
            done: false,
            lender: None,
        };
        Ok(BlobAnswer {
            size,
            range: Some(range),
            source,
            body: Some(BlobBody::Stream(body.into_stream())),
            redirect: None,
        })
    }
}

/// `(offset, len)` of `range` in a blob of `size` bytes.
fn span(range: ByteRange, size: u64) -> (u64, u64) {
    let end = range.end.unwrap_or(size).min(size);
    (range.start, end.saturating_sub(range.start))
}

/// How far ahead of what the fill received a range waits for the fill rather than fetching it.
fn ahead(p: &Progress) -> u64 {
    let Some(since) = p.since else {
        return AHEAD;
    };
    let secs = since.elapsed().as_secs_f64();
    if secs < 0.05 || p.received == 0 {
        return AHEAD;
    }
    let rate = p.received as f64 / secs;
    ((rate * FETCH_LATENCY.as_secs_f64()) as u64).clamp(AHEAD_MIN, AHEAD_MAX)
}

/// Waits until the fill received byte `start`: `false` when it failed first.
async fn reaches(rx: &mut watch::Receiver<Progress>, start: u64) -> bool {
    match rx.wait_for(|p| p.received > start || !usable(p)).await {
        Ok(p) => usable(&p),
        Err(_) => false,
    }
}

/// The fill may serve the rest of a ranged read of a blob of `size` bytes (a source that
/// answered the read with another size is not believed against the fill's).
fn serves(p: &Progress, size: u64) -> bool {
    usable(p) && p.size.is_none_or(|s| s == size)
}

/// The fill may still serve (it has not failed).
fn usable(p: &Progress) -> bool {
    !matches!(p.outcome, Some(Outcome::Failed(_) | Outcome::NotFound))
}

fn mismatch(p: &Progress) -> Option<Error> {
    match &p.outcome {
        Some(Outcome::Failed(e @ Error::DigestMismatch { .. })) => Some(e.clone()),
        _ => None,
    }
}

fn is_range_invalid(e: &Error) -> bool {
    matches!(e.engine_error(), Some(EngineError::RangeInvalid(_)))
        || e.to_oci().code == crate::oci::ErrorCode::RangeInvalid
}

/// What ranged reads of one request need.
#[derive(Clone)]
struct RangeFetch {
    sources: Arc<Sources>,
    digest: Digest,
    metrics: Metrics,
    min_rate: MinRate,
    /// Where a fill of the digest started after the response is found (its verdict counts too).
    fills: Fills,
}

/// An open ranged read.
struct Opened {
    size: u64,
    range: ByteRange,
    engine: Arc<str>,
    stream: ByteStream,
}

impl RangeFetch {
    /// A ranged read of `spec` from the first engine that has the blob (of `size` bytes when
    /// the fill knows it), answering exactly that range. A range outside the blob is an answer;
    /// any other failure moves on to the next engine.
    async fn open(&self, spec: RangeSpec, size: Option<u64>) -> Result<Opened> {
        let mut last_err = None;
        for (engine, repo) in self.sources.iter() {
            self.metrics.engine_request(engine.id());
            let hit = match engine
                .open_blob(repo, &self.digest, Lookup::body(Some(spec)))
                .await
            {
                Ok(Some(hit)) => hit,
                Ok(None) => continue,
                Err(e) if is_range_invalid(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(engine = engine.id(), error = %e, "ranged read failed");
                    self.metrics.upstream_error(engine.id());
                    last_err = Some(e);
                    continue;
                }
            };
            let want = spec.resolve(hit.size)?;
            let (offset, len) = hit.span();
            let got = (offset, offset + len);
            let asked = span(want, hit.size);
            let stream = match hit.body {
                Some(Hit::Stream(s)) => Some(s),
                Some(Hit::File(f)) => Some(f.stream()),
                Some(Hit::Redirect(_)) | None => None,
            };
            let fits = size.is_none_or(|s| s == hit.size) && got == (asked.0, asked.0 + asked.1);
            let Some(stream) = stream.filter(|_| fits) else {
                tracing::warn!(
                    engine = engine.id(),
                    size = hit.size,
                    ?got,
                    "ranged read answered other bytes than asked"
                );
                self.metrics.upstream_error(engine.id());
                last_err = Some(Error::permanent(
                    engine.id(),
                    "ranged read answered other bytes than asked",
                ));
                continue;
            };
            return Ok(Opened {
                size: hit.size,
                range: want,
                engine: engine.id().into(),
                stream: rate::guard(stream, self.min_rate, engine.id()),
            });
        }
        Err(last_err.unwrap_or_else(|| {
            Error::client(
                crate::oci::ErrorCode::BlobUnknown,
                format!("blob {} is unknown to every engine", self.digest),
            )
        }))
    }

    /// The answer streaming `read`, watching `fill` (when there is one) to break on a mismatch
    /// or to continue from it once it overtakes the read.
    fn answer(&self, read: Opened, fill: Option<Arc<FillState>>, range: ByteRange) -> BlobAnswer {
        let (offset, len) = span(range, read.size);
        // A large range lends its bytes to the fill, which then need not fetch them again.
        let lender = fill
            .as_ref()
            .filter(|_| len >= LEND_MIN)
            .map(|f| f.lender(read.size));
        let body = RangeBody {
            pos: offset,
            end: offset + len,
            size: read.size,
            rx: fill.as_ref().map(|f| f.watch()),
            lender,
            fill,
            src: Src::Fetch {
                stream: read.stream,
                engine: read.engine.clone(),
            },
            fetch: self.clone(),
            fell_back: false,
            done: false,
        };
        BlobAnswer {
            size: read.size,
            range: Some(range),
            source: read.engine,
            body: Some(BlobBody::Stream(body.into_stream())),
            redirect: None,
        }
    }
}

/// Where a ranged response's bytes come from now.
enum Src {
    Fill(ByteStream),
    Fetch {
        stream: ByteStream,
        engine: Arc<str>,
    },
}

/// The bytes `pos..end` of a ranged response, from the fill or a ranged read, switching as
/// either gets ahead or fails.
struct RangeBody {
    pos: u64,
    end: u64,
    /// The whole blob's size.
    size: u64,
    fill: Option<Arc<FillState>>,
    rx: Option<watch::Receiver<Progress>>,
    src: Src,
    fetch: RangeFetch,
    /// A failed source was replaced by a ranged read once already.
    fell_back: bool,
    done: bool,
    /// Lends the ranged read's bytes to the fill (only the first ranged read of a response).
    lender: Option<Lender>,
}

impl Drop for RangeBody {
    /// The response is over (its body ended, broke, or its client went away: the body stream
    /// drops it then): a lazy fill waits for this (see `FillPlan::lazy`), and the lender,
    /// dropped with it, closes its extent.
    fn drop(&mut self) {
        if let Some(f) = &self.fill {
            f.want();
        }
    }
}

impl RangeBody {
    fn into_stream(self) -> ByteStream {
        Box::pin(futures::stream::unfold(self, |mut b| async move {
            let item = b.next().await?;
            Some((item, b))
        }))
    }

    /// The mismatch verdict of the fill, if it came. A response that watches no fill (none ran
    /// when it began, or the one it watched failed otherwise) adopts one started since, so that
    /// every fill's verdict reaches every ranged response of the digest still in flight.
    fn mismatch(&mut self) -> Option<Error> {
        if self.rx.is_none() {
            let found = self.fetch.fills.running_fill(&self.fetch.digest);
            if let Some(f) = found.filter(|f| serves(&f.watch().borrow(), self.size)) {
                self.rx = Some(f.watch());
                self.fill = Some(f);
            }
        }
        self.rx.as_ref().and_then(|rx| mismatch(&rx.borrow()))
    }

    /// Ends the response with `e` (an error: the client sees a broken body, not an end).
    fn fail(&mut self, e: Error) -> Option<Result<Bytes>> {
        self.done = true;
        if matches!(e, Error::DigestMismatch { .. }) {
            self.fetch.metrics.range_broken();
        }
        Some(Err(e))
    }

    /// After the source in use failed with `e` at `pos`: the rest from the fill when it may
    /// still serve (and is not the source that failed), else from one more ranged read. `Err`
    /// when neither can take over.
    async fn take_over(&mut self, e: Error) -> std::result::Result<(), Error> {
        let left = self.end - self.pos;
        let fetch_failed = matches!(self.src, Src::Fetch { .. });
        let size = self.size;
        let fill = self
            .fill
            .as_ref()
            .filter(|f| fetch_failed && serves(&f.watch().borrow(), size))
            .cloned();
        self.lender = None;
        if let Some(f) = fill {
            tracing::warn!(error = %e, pos = self.pos, "ranged read failed; the rest from the fill");
            self.src = Src::Fill(f.follow_range(self.pos, left).into_stream());
            return Ok(());
        }
        if std::mem::replace(&mut self.fell_back, true) {
            return Err(e);
        }
        tracing::warn!(error = %e, pos = self.pos, "range source failed; fetching the rest");
        let spec = RangeSpec::From {
            start: self.pos,
            last: Some(self.end - 1),
        };
        match self.fetch.open(spec, Some(size)).await {
            Ok(read) if read.range.start == self.pos => {
                // A failed fill has nothing more to say but its verdict, which never comes.
                if !fetch_failed {
                    self.rx = None;
                    self.fill = None;
                }
                self.src = Src::Fetch {
                    stream: read.stream,
                    engine: read.engine,
                };
                Ok(())
            }
            _ => Err(e),
        }
    }

    async fn next(&mut self) -> Option<Result<Bytes>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(e) = self.mismatch() {
                return self.fail(e);
            }
            if self.pos >= self.end {
                self.done = true;
                return None;
            }
            let left = self.end - self.pos;
            let failed = match &mut self.src {
                Src::Fill(s) => match s.next().await {
                    Some(Ok(b)) if b.len() as u64 <= left => {
                        self.pos += b.len() as u64;
                        return Some(Ok(b));
                    }
                    Some(Ok(_)) => Error::transient("range", "fill read past the range"),
                    Some(Err(e)) => e,
                    None => Error::transient("range", "the fill ended early"),
                },
                Src::Fetch { stream, engine } => {
                    let engine = engine.clone();
                    // The fill overtook the read: the rest from the fill.
                    let overtaken = self.rx.as_ref().is_some_and(|rx| {
                        let p = rx.borrow();
                        serves(&p, self.size)
                            && (p.verified
                                || matches!(p.outcome, Some(Outcome::Done))
                                || p.received >= self.pos.saturating_add(OVERTAKE.min(left)))
                    });
                    if let (true, Some(fill)) = (overtaken, &self.fill) {
                        self.lender = None;
                        self.src = Src::Fill(fill.follow_range(self.pos, left).into_stream());
                        continue;
                    }
                    let rx = &mut self.rx;
                    let changed = async {
                        match rx.as_mut() {
                            Some(rx) => rx.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    };
                    let item = tokio::select! {
                        item = stream.next() => item,
                        alive = changed => {
                            if !alive {
                                self.rx = None;
                            }
                            continue;
                        }
                    };
                    match item {
                        Some(Ok(b)) if b.len() as u64 <= left => {
                            self.fetch
                                .metrics
                                .range_fetch_bytes(&engine, b.len() as u64);
                            if let Some(l) = &mut self.lender {
                                l.lend(self.pos, &b);
                            }
                            self.pos += b.len() as u64;
                            return Some(Ok(b));
                        }
                        Some(Ok(_)) => {
                            Error::permanent(&engine, "ranged read sent more bytes than asked")
                        }
                        Some(Err(e)) => e,
                        None => Error::transient(&engine, "ranged read ended early"),
                    }
                }
            };
            if let Some(m) = self.mismatch() {
                return self.fail(m);
            }
            if let Err(e) = self.take_over(failed).await {
                return self.fail(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{BlobHit, EngineKind, Manifest, ManifestMeta};
    use crate::oci::Reference;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const CHUNK: usize = 64 << 10;

    /// An engine holding one blob: whole reads and ranged reads paced apart, the whole read
    /// optionally wrong, the first ranged read optionally breaking.
    #[derive(Debug, Default)]
    struct Blob {
        data: Bytes,
        whole_every: Duration,
        range_every: Duration,
        corrupt_whole: bool,
        corrupt_ranges: bool,
        range_breaks_after: Option<usize>,
        ranged: AtomicUsize,
        /// Bytes whole reads handed out.
        whole_sent: Arc<std::sync::atomic::AtomicU64>,
    }

    #[async_trait::async_trait]
    impl Engine for Blob {
        fn id(&self) -> &str {
            "up"
        }
        fn kind(&self) -> EngineKind {
            EngineKind::Registry
        }
        async fn open_blob(
            &self,
            _: &RepoName,
            _: &Digest,
            want: Lookup,
        ) -> Result<Option<BlobHit>> {
            let size = self.data.len() as u64;
            let range = want.range.map(|s| s.resolve(size)).transpose()?;
            if !want.body {
                return Ok(Some(BlobHit {
                    size,
                    range,
                    body: None,
                }));
            }
            let (start, end) = range.map_or((0, size), |r| (r.start, r.end.unwrap_or(size)));
            let mut bytes = self.data.slice(start as usize..end as usize).to_vec();
            let mut first_ranged = false;
            // A fill resuming asks an open-ended range: it is paced (and counted) as a whole
            // read; a ranged read of a client's range names its last byte.
            let client_range = matches!(
                want.range,
                Some(RangeSpec::From { last: Some(_), .. }) | Some(RangeSpec::Suffix(_))
            );
            let whole = !client_range;
            let every = if client_range {
                first_ranged = self.ranged.fetch_add(1, Ordering::SeqCst) == 0;
                if self.corrupt_ranges {
                    bytes[10] ^= 0x5a;
                }
                self.range_every
            } else {
                if self.corrupt_whole {
                    bytes[10] ^= 0x5a;
                }
                self.whole_every
            };
            let mut items: Vec<Result<Bytes>> = bytes
                .chunks(CHUNK)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            if let (Some(n), true) = (self.range_breaks_after, first_ranged) {
                items.truncate(n / CHUNK);
                items.push(Err(Error::transient("up", "connection reset")));
            }
            let sent = self.whole_sent.clone();
            let stream = futures::stream::iter(items).then(move |c| {
                let sent = sent.clone();
                async move {
                    tokio::time::sleep(every).await;
                    if let (true, Ok(c)) = (whole, &c) {
                        sent.fetch_add(c.len() as u64, Ordering::SeqCst);
                    }
                    c
                }
            });
            Ok(Some(BlobHit {
                size,
                range,
                body: Some(Hit::Stream(Box::pin(stream))),
            }))
        }
        async fn get_manifest(
            &self,
            _: &RepoName,
            _: &Reference,
            _: &[String],
        ) -> Result<Option<Manifest>> {
            Ok(None)
        }
        async fn head_manifest(
            &self,
            _: &RepoName,
            _: &Reference,
            _: &[String],
        ) -> Result<Option<ManifestMeta>> {
            Ok(None)
        }
        async fn list_tags(&self, _: &RepoName) -> Result<Option<Vec<String>>> {
            Ok(None)
        }
        async fn probe(&self) -> Result<()> {
            Ok(())
        }
    }

    fn blob(mib: usize) -> Bytes {
        Bytes::from((0..mib << 20).map(|i| (i % 253) as u8).collect::<Vec<u8>>())
    }

    struct Setup {
        engine: Arc<Blob>,
        fills: Fills,
        sources: Sources,
        fill: Option<Arc<FillState>>,
        fetch: RangeFetch,
        metrics: Metrics,
        _dir: tempfile::TempDir,
    }

    /// `engine`'s blob, with its fill running when `fill`.
    fn setup(engine: Blob, fill: bool) -> Setup {
        let digest = Digest::sha256_of(&engine.data);
        let engine = Arc::new(engine);
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let fills = Fills::new(dir.path().to_path_buf(), metrics.clone());
        let sources: Sources = vec![(engine.clone() as Arc<dyn Engine>, "a/b".parse().unwrap())];
        let fill = fill.then(|| {
            fills.join_or_start(&digest).start_with(|| FillPlan {
                sources: sources.clone(),
                target: None,
                lazy: false,
            })
        });
        Setup {
            engine,
            fills: fills.clone(),
            sources: sources.clone(),
            fill,
            fetch: RangeFetch {
                sources: Arc::new(sources),
                digest,
                metrics: metrics.clone(),
                min_rate: MinRate::default(),
                fills,
            },
            metrics,
            _dir: dir,
        }
    }

    /// The body of a ranged read of `start..end` answered beside `s`'s fill.
    async fn ranged(s: &Setup, start: u64, end: u64) -> ByteStream {
        let spec = RangeSpec::From {
            start,
            last: Some(end - 1),
        };
        let read = s.fetch.open(spec, None).await.unwrap();
        let range = read.range;
        match s.fetch.answer(read, s.fill.clone(), range).body {
            Some(BlobBody::Stream(b)) => b,
            _ => panic!("not a stream"),
        }
    }

    async fn collect(mut b: ByteStream) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = b.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    fn counter(m: &Metrics, series: &str) -> f64 {
        m.encode()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// A slow ranged read that the fill overtakes continues from the fill: right bytes, and the
    /// ranged read is dropped well before its end.
    #[tokio::test]
    async fn a_ranged_read_the_fill_overtakes_continues_from_the_fill() {
        let data = blob(4);
        let s = setup(
            Blob {
                data: data.clone(),
                whole_every: Duration::from_millis(1),
                range_every: Duration::from_millis(50),
                ..Blob::default()
            },
            true,
        );
        let got = collect(ranged(&s, 2 << 20, 4 << 20).await).await.unwrap();
        assert!(got == data[2 << 20..], "wrong bytes");
        let fetched = counter(&s.metrics, "ociedge_range_fetch_bytes_total{engine=\"up\"}");
        assert!(
            fetched < (1 << 20) as f64,
            "the ranged read ran on: {fetched}"
        );
    }

    /// A fill whose verdict is a mismatch breaks a ranged response still in flight (whatever
    /// serves it then), and counts it.
    #[tokio::test]
    async fn a_mismatch_breaks_a_ranged_response_in_flight() {
        for range_every in [Duration::from_millis(5), Duration::from_secs(1)] {
            let s = setup(
                Blob {
                    data: blob(2),
                    whole_every: Duration::from_millis(1),
                    range_every,
                    corrupt_whole: true,
                    ..Blob::default()
                },
                true,
            );
            let mut body = ranged(&s, 1 << 20, 2 << 20).await;
            // Usually the first piece is there before the verdict; on a loaded machine the
            // verdict may come first, and then the first piece is already the break.
            let rest = match body.next().await.expect("a first piece") {
                Ok(_) => {
                    // The client waits; the verdict comes meanwhile.
                    let mut rx = s.fill.as_ref().unwrap().watch();
                    let waited = tokio::time::timeout(
                        Duration::from_secs(20),
                        rx.wait_for(|p| p.outcome.is_some()),
                    );
                    drop(waited.await.expect("no verdict").unwrap());
                    collect(body).await.map(|b| b.len())
                }
                Err(e) => Err(e),
            };
            assert!(
                matches!(rest, Err(Error::DigestMismatch { .. })),
                "{range_every:?}: {rest:?}"
            );
            assert_eq!(
                counter(&s.metrics, "ociedge_range_responses_broken_total"),
                1.0
            );
        }
    }

    /// A fill started after a ranged response began (by another request) still breaks it with
    /// a mismatch verdict.
    #[tokio::test]
    async fn a_fill_started_later_breaks_a_ranged_response_too() {
        let s = setup(
            Blob {
                data: blob(2),
                whole_every: Duration::from_millis(1),
                range_every: Duration::from_millis(20),
                corrupt_whole: true,
                ..Blob::default()
            },
            false,
        );
        let mut body = ranged(&s, 1 << 20, 2 << 20).await;
        assert!(body.next().await.unwrap().is_ok());
        let fill = s
            .fills
            .join_or_start(&s.fetch.digest)
            .start_with(|| FillPlan {
                sources: s.sources.clone(),
                target: None,
                lazy: false,
            });
        let mut rx = fill.watch();
        let waited = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|p| p.received > 0));
        drop(waited.await.expect("the fill did not start").unwrap());
        // The response reads on (and finds the fill), then its client waits for a while, in
        // which the fill comes to its verdict.
        assert!(body.next().await.unwrap().is_ok());
        let waited = tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|p| p.outcome.is_some()),
        );
        drop(waited.await.expect("no verdict").unwrap());
        let rest = collect(body).await.map(|b| b.len());
        assert!(
            matches!(rest, Err(Error::DigestMismatch { .. })),
            "{rest:?}"
        );
        assert_eq!(
            counter(&s.metrics, "ociedge_range_responses_broken_total"),
            1.0
        );
    }

    /// A ranged read that breaks mid-way is continued from the fill; without a fill, by one
    /// more ranged read from the byte reached.
    #[tokio::test]
    async fn a_broken_ranged_read_is_continued() {
        let data = blob(4);
        for fill in [true, false] {
            let s = setup(
                Blob {
                    data: data.clone(),
                    whole_every: Duration::from_millis(2),
                    range_every: Duration::ZERO,
                    range_breaks_after: Some(256 << 10),
                    ..Blob::default()
                },
                fill,
            );
            let got = collect(ranged(&s, 1 << 20, 3 << 20).await).await.unwrap();
            assert!(got == data[1 << 20..3 << 20], "fill {fill}: wrong bytes");
            let reads = if fill { 1 } else { 2 };
            assert_eq!(s.engine.ranged.load(Ordering::SeqCst), reads, "fill {fill}");
        }
    }

    /// The fill's outcome, waited for.
    async fn outcome(fill: &Arc<FillState>) -> Outcome {
        let mut rx = fill.watch();
        let p = tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|p| p.outcome.is_some()),
        )
        .await
        .expect("no verdict")
        .unwrap();
        p.outcome.clone().unwrap()
    }

    /// Parallel large ranges lend their bytes to the fill (containerd's multipart fetch): the
    /// fill fetches about the first range itself, takes the rest from the spool, and its
    /// verdict is right.
    #[tokio::test]
    async fn parallel_large_ranges_lend_their_bytes_to_the_fill() {
        let data = blob(32);
        let s = setup(
            Blob {
                data: data.clone(),
                whole_every: Duration::from_millis(2),
                range_every: Duration::ZERO,
                ..Blob::default()
            },
            true,
        );
        let mib = 1u64 << 20;
        let (s, data) = (&s, &data);
        let reads = [8, 16, 24].map(|m| async move {
            let got = collect(ranged(s, m * mib, (m + 8) * mib).await)
                .await
                .unwrap();
            assert!(
                got == data[(m * mib) as usize..((m + 8) * mib) as usize],
                "range at {m} MiB"
            );
        });
        futures::future::join_all(reads).await;
        let fill = s.fill.as_ref().unwrap();
        assert!(matches!(outcome(fill).await, Outcome::Done), "verified");
        let whole = s.engine.whole_sent.load(Ordering::SeqCst);
        assert!(whole < 16 * mib, "the fill fetched {whole} bytes itself");
        let lent = counter(&s.metrics, "ociedge_fill_lent_bytes_total");
        assert!(lent >= (16 * mib) as f64, "lent {lent}");
    }

    /// Lent bytes count in the fill's digest like its own: wrong ones fail the fill (nothing
    /// would be committed).
    #[tokio::test]
    async fn wrong_lent_bytes_fail_the_fill() {
        let s = setup(
            Blob {
                data: blob(16),
                whole_every: Duration::from_millis(2),
                range_every: Duration::ZERO,
                corrupt_ranges: true,
                ..Blob::default()
            },
            true,
        );
        let mib = 1u64 << 20;
        let _ = collect(ranged(&s, 8 * mib, 16 * mib).await).await;
        let fill = s.fill.as_ref().unwrap();
        assert!(
            matches!(
                outcome(fill).await,
                Outcome::Failed(Error::DigestMismatch { .. })
            ),
            "the fill took the lent bytes and found them wrong"
        );
        assert!(counter(&s.metrics, "ociedge_fill_lent_bytes_total") > 0.0);
    }

    /// A ranged read going at a slow client's pace is not followed by the fill: the fill fetches
    /// the rest itself (and the slow response then continues from the fill).
    #[tokio::test]
    async fn a_slow_lender_does_not_hold_the_fill_back() {
        let data = blob(16);
        let s = setup(
            Blob {
                data: data.clone(),
                whole_every: Duration::from_millis(1),
                range_every: Duration::from_millis(30),
                ..Blob::default()
            },
            true,
        );
        let mib = 1u64 << 20;
        let got = collect(ranged(&s, 8 * mib, 16 * mib).await).await.unwrap();
        assert!(got == data[8 << 20..], "wrong bytes");
        assert!(matches!(
            outcome(s.fill.as_ref().unwrap()).await,
            Outcome::Done
        ));
        let fetched = counter(&s.metrics, "ociedge_range_fetch_bytes_total{engine=\"up\"}");
        assert!(
            fetched < (4 * mib) as f64,
            "the fill waited for the slow ranged read: {fetched}"
        );
    }
}
