//! Reading local files as byte streams in large chunks, off the async threads.
//!
//! object_store's local reads come in 8 KiB pieces; a hit path that wants disk speed reads
//! 512 KiB at a time with `pread`, so several readers can share one open file without seeking.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;

/// A stream of body bytes: what engines, fills and spools pass around (also
/// `crate::engine::ByteStream`).
pub type ByteStream = BoxStream<'static, crate::error::Result<Bytes>>;

/// Read size of file streams.
pub const CHUNK: usize = 512 * 1024;

/// The first read of a file stream: all that a response whose receiver never takes a byte (an
/// HTTP/2 stream whose window stays closed) ever holds. Reads then double up to [`CHUNK`], and
/// read-ahead starts only once the first chunk was taken.
pub const FIRST_CHUNK: usize = 16 * 1024;

/// Reads up to this size get a buffer of their own, of their size.
const SMALL_READ: usize = 64 * 1024;

/// Read buffers of [`CHUNK`] bytes kept for reuse, process-wide: zeroed once when made, then
/// reused, where a fresh buffer per read costs a memset and page faults every time (in a profile
/// of 16 readers of one fill, ~15% of the CPU). Bounded, so idle memory stays flat.
static READ_BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
const READ_BUFFERS_KEPT: usize = 16;

/// A read buffer that goes back to [`READ_BUFFERS`] when the last `Bytes` of it is dropped.
struct ReadBuffer(Vec<u8>);

impl AsRef<[u8]> for ReadBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if let Ok(mut kept) = READ_BUFFERS.lock() {
            if kept.len() < READ_BUFFERS_KEPT {
                kept.push(buf);
            }
        }
    }
}

/// Reads `len` bytes at `offset` in one blocking call. Fewer bytes means the file is shorter.
/// Up to [`CHUNK`] bytes go into a reused buffer; larger reads land in a new buffer's spare
/// capacity. Either way nothing is zeroed per read (it cost 10% of a TLS hit).
pub async fn read_at(file: Arc<File>, offset: u64, len: usize) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        // (a small read must not pin a whole pooled buffer while its bytes wait to be sent)
        if len > CHUNK || len <= SMALL_READ {
            return read_new(&file, offset, len);
        }
        let mut buf = READ_BUFFERS
            .lock()
            .ok()
            .and_then(|mut kept| kept.pop())
            .unwrap_or_else(|| vec![0; CHUNK]);
        let mut filled = 0;
        while filled < len {
            match file.read_at(&mut buf[filled..len], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::from_owner(ReadBuffer(buf)).slice(..filled))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// [`read_at`] for a read larger than a pooled buffer.
fn read_new(file: &File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Bytes::from(buf))
}

/// Bytes of file reads that response bodies may hold in memory at once, over the whole process.
pub const PROCESS_READ_BUDGET: usize = 128 << 20;
/// The same for one connection (one HTTP/2 connection carries up to 256 streams), so one client
/// cannot take the process's budget from the others.
pub const CONNECTION_READ_BUDGET: usize = 16 << 20;
/// Budgets are counted in units of this many bytes.
const BUDGET_UNIT: usize = 1024;

static PROCESS_BUDGET: std::sync::LazyLock<Arc<Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(Semaphore::new(PROCESS_READ_BUDGET / BUDGET_UNIT)));

tokio::task_local! {
    /// The budget of the connection whose request is being handled (see [`with_connection_budget`]).
    static CONNECTION_BUDGET: Arc<Semaphore>;
}

/// A new budget for one connection's response bodies.
pub fn connection_budget() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(CONNECTION_READ_BUDGET / BUDGET_UNIT))
}

/// Runs a request's handler with `budget` as its connection's: file streams made inside it
/// count their reads against it, and against the process's, until each chunk is dropped (sent,
/// or its stream gone). Beyond either, reads wait: a client whose HTTP/2 windows stay shut (it
/// never takes a byte) holds at most the connection's budget, and delays others' reads only
/// until `limits.send_timeout` drops its connection.
pub async fn with_connection_budget<F: std::future::Future>(
    budget: Arc<Semaphore>,
    f: F,
) -> F::Output {
    CONNECTION_BUDGET.scope(budget, f).await
}

/// The budgets a file stream made now reads against.
#[derive(Clone)]
pub struct ReadBudget {
    connection: Option<Arc<Semaphore>>,
}

/// Permits held by a chunk for as long as its bytes live.
struct Budgeted {
    bytes: Bytes,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl ReadBudget {
    /// The budgets of the request being handled (the process's alone outside a request).
    pub fn current() -> ReadBudget {
        ReadBudget {
            connection: CONNECTION_BUDGET.try_with(|b| b.clone()).ok(),
        }
    }

    /// Reads `want` bytes of `file` at `pos` once the budgets allow (the connection's first, so
    /// a client over its own budget never holds the process's while it waits).
    pub async fn read(&self, file: Arc<File>, pos: u64, want: usize) -> std::io::Result<Bytes> {
        let units = u32::try_from(want.div_ceil(BUDGET_UNIT)).unwrap_or(u32::MAX);
        let closed = |_| std::io::Error::other("read budget closed");
        let connection = match &self.connection {
            Some(c) => Some(c.clone().acquire_many_owned(units).await.map_err(closed)?),
            None => None,
        };
        let process = PROCESS_BUDGET
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(closed)?;
        let bytes = read_at(file, pos, want).await?;
        Ok(Bytes::from_owner(Budgeted {
            bytes,
            _permits: (process, connection),
        }))
    }
}

/// A stream of exactly `len` bytes of `file` from `offset`: a first chunk of [`FIRST_CHUNK`]
/// bytes alone, then chunks doubling up to [`CHUNK`] with one read ahead, so the disk read of the
/// next chunk overlaps the socket write of this one (a receiver that takes nothing holds one small
/// chunk). A file shorter than that ends the stream with an error, never a clean short end.
pub fn stream_range(file: Arc<File>, offset: u64, len: u64) -> ByteStream {
    let end = offset + len;
    let budget = ReadBudget::current();
    let read = move |file: Arc<File>, pos: u64, want: usize| {
        let budget = budget.clone();
        async move {
            let chunk = budget.read(file, pos, want).await.map_err(Error::Io)?;
            if chunk.len() < want {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file ended before its recorded size",
                )));
            }
            Ok(chunk)
        }
    };
    if len == 0 {
        return Box::pin(stream::empty());
    }
    let first = len.min(FIRST_CHUNK as u64) as usize;
    let head = stream::once(read(file.clone(), offset, first));
    let mut pos = offset + first as u64;
    let mut size = FIRST_CHUNK * 2;
    let chunks = std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let want = (end - pos).min(size as u64) as usize;
        let at = pos;
        pos += want as u64;
        size = (size * 2).min(CHUNK);
        Some(read(file.clone(), at, want))
    });
    Box::pin(head.chain(stream::iter(chunks).buffered(2)))
}

/// A byte range of an open local file, as a response body: the plain HTTP/1.1 front sends it with
/// `sendfile`, anything else reads it with [`stream_range`].
pub struct FileSlice {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
    /// Held until the slice is sent or dropped (an eviction pin: the file stays where it is).
    pub keep: Option<Box<dyn Send + Sync>>,
}

impl FileSlice {
    pub fn stream(&self) -> ByteStream {
        stream_range(self.file.clone(), self.offset, self.len)
    }
}

/// Opens `rel` (a `/`-separated path of plain names) under the directory `root` for reading, never
/// following a symbolic link on the way (a link anywhere below `root` is refused, so a blob file
/// replaced by a link to a secret is never read through it), and only if it is a regular file (a
/// FIFO or a device is refused without blocking on it). `root` must be canonical (no links in it).
/// Returns the file and its size. A missing file is `ErrorKind::NotFound`; a link or a special
/// file is `ErrorKind::InvalidData`.
pub fn open_beneath(root: &Path, rel: &str) -> std::io::Result<(File, u64)> {
    static NO_OPENAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    open_regular(root, rel, &NO_OPENAT2)
}

/// [`open_beneath`], by `openat2` unless `no_openat2` is set (or gets set when the kernel lacks
/// it), else by a walk that opens each component with `O_NOFOLLOW`.
fn open_regular(
    root: &Path,
    rel: &str,
    no_openat2: &std::sync::atomic::AtomicBool,
) -> std::io::Result<(File, u64)> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::sync::atomic::Ordering;
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{rel:?} is not a plain relative path"),
        ));
    }
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let flags =
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    let link = |e: rustix::io::Errno| -> std::io::Error {
        match e {
            // ELOOP: a link was met (RESOLVE_NO_SYMLINKS, O_NOFOLLOW); ENOTDIR: a link where a
            // directory was expected (O_DIRECTORY|O_NOFOLLOW).
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR | rustix::io::Errno::XDEV => {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{rel}: a symbolic link in the path; not followed"),
                )
            }
            e => e.into(),
        }
    };
    let mut tries = 0;
    let fd = loop {
        tries += 1;
        if !no_openat2.load(Ordering::Relaxed) {
            match rustix::fs::openat2(
                rustix::fs::CWD,
                root.join(rel),
                flags,
                Mode::empty(),
                ResolveFlags::NO_SYMLINKS,
            ) {
                Ok(fd) => break fd,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) if tries < 8 => continue,
                // Kernels before 5.6 (or a seccomp filter) lack openat2: walk the path instead.
                Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {
                    no_openat2.store(true, Ordering::Relaxed);
                    continue;
                }
                Err(e) => return Err(link(e)),
            }
        }
        let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut dir = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let (last, dirs) = parts.split_last().ok_or(std::io::ErrorKind::InvalidInput)?;
        for d in dirs {
            dir = rustix::fs::openat(&dir, *d, dir_flags, Mode::empty()).map_err(link)?;
        }
        break rustix::fs::openat(&dir, *last, flags, Mode::empty()).map_err(link)?;
    };
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{rel}: not a regular file"),
        ));
    }
    Ok((file, meta.len()))
}

/// Opens the directory `rel` under `root` (made like `create_dir_all` where missing) so that no
/// component of it is a symbolic link: a link found in the way is removed (nothing in the store is
/// a link of ours) and a directory made in its place. Writes made relative to the returned
/// directory never land outside the store.
pub fn dir_beneath(root: &Path, rel: &str) -> std::io::Result<rustix::fd::OwnedFd> {
    walk_dirs(root, rel, true)
}

/// Opens the directory `rel` under `root` without following a link on the way (and without
/// making or removing anything): a link in the way is `ErrorKind::InvalidData`, a missing
/// directory `ErrorKind::NotFound`.
pub fn dir_nofollow(root: &Path, rel: &str) -> std::io::Result<rustix::fd::OwnedFd> {
    walk_dirs(root, rel, false)
}

fn walk_dirs(root: &Path, rel: &str, make: bool) -> std::io::Result<rustix::fd::OwnedFd> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    use rustix::io::Errno;
    let at = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{rel:?} is not a plain relative path"),
            ));
        }
        let mut tries = 0;
        dir = loop {
            tries += 1;
            match rustix::fs::openat(&dir, part, at, Mode::empty()) {
                Ok(fd) => break fd,
                Err(_) if tries > 4 => {
                    return Err(std::io::Error::other(format!(
                        "{rel}: cannot make {part:?} a directory"
                    )))
                }
                Err(Errno::NOENT) if !make => return Err(Errno::NOENT.into()),
                Err(Errno::NOTDIR | Errno::LOOP) if !make => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{rel}: a symbolic link or a file in the path; not followed"),
                    ))
                }
                Err(Errno::NOENT) => match rustix::fs::mkdirat(&dir, part, Mode::from(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                },
                Err(Errno::NOTDIR | Errno::LOOP) => {
                    let st = rustix::fs::statat(&dir, part, AtFlags::SYMLINK_NOFOLLOW)?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
                        return Err(std::io::Error::other(format!(
                            "{rel}: {part:?} is not a directory"
                        )));
                    }
                    tracing::warn!(path = %root.join(rel).display(), "removing a symbolic link from the store's tree");
                    match rustix::fs::unlinkat(&dir, part, AtFlags::empty()) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
    }
    Ok(dir)
}

/// The extended attribute that records a committed blob file's size: a file whose length differs
/// from it was truncated or rewritten by someone else, and is not served.
const SIZE_XATTR: &str = "user.ociedge.size";

/// Records `size` as the committed size of `file` (best effort: a filesystem without user
/// extended attributes records nothing, and such files are only checked by `ociedge verify`).
pub fn record_size(file: &File, size: u64) {
    let _ = rustix::fs::fsetxattr(
        file,
        SIZE_XATTR,
        size.to_string().as_bytes(),
        rustix::fs::XattrFlags::empty(),
    );
}

/// The size recorded for `file` by [`record_size`], if any.
pub fn recorded_size(file: &File) -> Option<u64> {
    let mut buf = [0u8; 24];
    let n = rustix::fs::fgetxattr(file, SIZE_XATTR, &mut buf).ok()?;
    std::str::from_utf8(buf.get(..n)?).ok()?.parse().ok()
}

/// Reads a whole small file that must be a regular file (links to one are followed) of at most
/// `cap` bytes: a FIFO, a device (`/dev/zero`) or an oversized file is refused without blocking
/// or reading past the cap.
pub fn read_regular_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(
            rustix::fs::OFlags::NONBLOCK.bits() as i32 | rustix::fs::OFlags::NOCTTY.bits() as i32,
        )
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    if meta.len() > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} bytes, more than the {cap} allowed", meta.len()),
        ));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than the {cap} bytes allowed"),
        ));
    }
    Ok(buf)
}

/// A spool file, removed when dropped (committed copies are hard links or uploads of it).
pub struct Spool {
    pub path: std::path::PathBuf,
    /// Bytes written.
    pub size: u64,
    /// What the bytes hash to (with the algorithm of the digest they were expected under).
    pub actual: crate::oci::Digest,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `body` into a new file of `dir` while hashing it, and syncs it: the caller compares
/// `actual` with the digest it expected before committing anything under that digest.
pub async fn spool_hashed(
    dir: &std::path::Path,
    prefix: &str,
    expected: &crate::oci::Digest,
    mut body: ByteStream,
) -> crate::error::Result<Spool> {
    use tokio::io::AsyncWriteExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(
        "{prefix}-{}.{:016x}.part",
        expected.hex(),
        rand::random::<u64>()
    ));
    // From here on the file is removed on every exit, error or not.
    let mut spool = Spool {
        path,
        size: 0,
        actual: expected.clone(),
    };
    let mut file = tokio::fs::File::create(&spool.path).await?;
    let mut verifier = crate::oci::Verifier::new(expected);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        verifier.update(&chunk);
        spool.size += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    file.sync_all().await?;
    spool.actual = verifier.finish();
    Ok(spool)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks not taken (an HTTP/2 stream whose window stays shut) hold their connection's budget;
    /// beyond it the connection's next reads wait, and reads of other connections do not.
    #[tokio::test]
    async fn chunks_not_taken_hold_the_connections_budget_and_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let len = 1 << 20;
        let budget = Arc::new(Semaphore::new(40)); // 40 KiB
        let (mut a, mut b) = with_connection_budget(budget.clone(), async {
            (
                stream_range(file.clone(), 0, len),
                stream_range(file.clone(), 0, len),
            )
        })
        .await;
        let wait = std::time::Duration::from_millis(300);
        let a1 = a.next().await.unwrap().unwrap();
        let b1 = b.next().await.unwrap().unwrap();
        assert_eq!((a1.len(), b1.len()), (FIRST_CHUNK, FIRST_CHUNK));
        assert_eq!(budget.available_permits(), 8);
        // a's next read (32 KiB) does not fit while both first chunks are held.
        assert!(tokio::time::timeout(wait, a.next()).await.is_err());
        drop(b1);
        assert!(tokio::time::timeout(wait, a.next()).await.is_err());
        // Another connection's stream is not held back by this one's budget.
        let mut other = stream_range(file.clone(), 0, len);
        assert!(tokio::time::timeout(wait * 10, other.next()).await.is_ok());
        drop(a1);
        let a2 = tokio::time::timeout(wait * 10, a.next())
            .await
            .expect("a read once the budget is free")
            .unwrap()
            .unwrap();
        assert_eq!(a2.len(), 2 * FIRST_CHUNK);
        drop((a2, a, b));
        assert_eq!(budget.available_permits(), 40, "every permit is back");
    }

    #[test]
    fn checked_opens_refuse_links_and_special_files_both_ways() {
        let root = tempfile::tempdir().unwrap();
        let root_path = root.path().canonicalize().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("data"), b"secret").unwrap();
        std::fs::create_dir_all(root_path.join("a/b")).unwrap();
        std::fs::write(root_path.join("a/b/data"), b"blob").unwrap();
        std::os::unix::fs::symlink(outside.path().join("data"), root_path.join("a/link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root_path.join("d")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root_path.join("a/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        for walk in [false, true] {
            let flag = std::sync::atomic::AtomicBool::new(walk);
            let open = |rel: &str| open_regular(&root_path, rel, &flag);
            let (_, size) = open("a/b/data").unwrap();
            assert_eq!(size, 4);
            for (rel, kind) in [
                ("a/link", std::io::ErrorKind::InvalidData),
                ("d/data", std::io::ErrorKind::InvalidData),
                ("a/fifo", std::io::ErrorKind::InvalidData),
                ("a/missing", std::io::ErrorKind::NotFound),
                ("a/../a/b/data", std::io::ErrorKind::InvalidInput),
            ] {
                let e = open(rel).map(|_| ()).unwrap_err();
                assert_eq!(e.kind(), kind, "{rel} (walk: {walk}): {e}");
            }
        }
        // Directories: a link in the way is refused, or replaced by a real directory.
        assert_eq!(
            dir_nofollow(&root_path, "d")
                .map(|_| ())
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::InvalidData
        );
        dir_beneath(&root_path, "d/x").unwrap();
        assert!(root_path.join("d").symlink_metadata().unwrap().is_dir());
        assert!(!outside.path().join("x").exists());
    }

    #[test]
    fn capped_reads_refuse_devices_fifos_and_big_files() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(read_regular_capped(&fifo, 1024).is_err());
        assert!(read_regular_capped(Path::new("/dev/zero"), 1024).is_err());
        let big = d.path().join("big");
        std::fs::write(&big, vec![b'x'; 2048]).unwrap();
        assert!(read_regular_capped(&big, 1024).is_err());
        assert_eq!(read_regular_capped(&big, 2048).unwrap().len(), 2048);
    }

    #[tokio::test]
    async fn reads_reuse_buffers_without_leaking_old_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let a = read_at(file.clone(), 0, 1000).await.unwrap();
        assert!(a.iter().all(|&b| b == 7));
        drop(a);
        std::fs::write(&path, vec![9u8; 10]).unwrap();
        let b = read_at(file, 0, 1000).await.unwrap();
        assert_eq!(&b[..], &[9u8; 10][..]);
    }
}
