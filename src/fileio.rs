//! Reading local files as byte streams in large chunks, off the async threads.
//!
//! object_store's local reads come in 8 KiB pieces; a hit path that wants disk speed reads
//! 512 KiB at a time with `pread`, so several readers can share one open file without seeking.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{stream, StreamExt};

use crate::engine::ByteStream;
use crate::error::Error;

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

/// A stream of exactly `len` bytes of `file` from `offset`: a first chunk of [`FIRST_CHUNK`]
/// bytes alone, then chunks doubling up to [`CHUNK`] with one read ahead, so the disk read of the
/// next chunk overlaps the socket write of this one (a receiver that takes nothing holds one small
/// chunk). A file shorter than that ends the stream with an error, never a clean short end.
pub fn stream_range(file: Arc<File>, offset: u64, len: u64) -> ByteStream {
    let end = offset + len;
    let read = move |file: Arc<File>, pos: u64, want: usize| async move {
        let chunk = read_at(file, pos, want).await.map_err(Error::Io)?;
        if chunk.len() < want {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file ended before its recorded size",
            )));
        }
        Ok(chunk)
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
