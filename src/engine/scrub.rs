//! `ociedge verify`: a scrub of a storage engine. Every blob under
//! `docker/registry/v2/blobs/<alg>/<hex[0..2]>/<hex>/data` is read whole and hashed; what does
//! not hash to its name is removed (the next pull fetches it again), and so is anything in a
//! `file://` engine's blob tree that is not a regular file (a symbolic link, a FIFO): the scrub
//! never reads or deletes through a link.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use super::storage::StorageEngine;
use super::Engine;
use crate::error::{Error, Result};
use crate::oci::{Digest, Verifier};

/// A blob found by the scrub.
#[derive(Clone, Debug)]
pub struct Found {
    /// Its key in the store (`docker/registry/v2/blobs/...`).
    pub key: String,
    /// The digest its path names, if the path is a well-formed one.
    pub digest: Option<Digest>,
    pub size: u64,
    /// Not a regular file (a link, a special file): removed without being read.
    pub not_a_file: bool,
}

/// What a scrub did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Blobs looked at, and their bytes.
    pub blobs: u64,
    pub bytes: u64,
    /// Keys removed, with why.
    pub removed: Vec<(String, String)>,
    /// Blobs that could not be checked (read errors), with why: left in place.
    pub errors: Vec<(String, String)>,
}

const BLOBS: &str = "docker/registry/v2/blobs";

/// The digest a blob key names (`.../blobs/sha256/ab/ab12.../data`).
fn digest_of(key: &str) -> Option<Digest> {
    let rest = key.strip_prefix(BLOBS)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [alg, two, hex, "data"] if hex.len() >= 2 && hex.get(..2) == Some(*two) => {
            format!("{alg}:{hex}").parse().ok()
        }
        _ => None,
    }
}

/// Walks a `file://` engine's blob tree without following links: links and special files are
/// reported as `not_a_file`, wherever they are in the tree.
fn walk_dir(root: &FsPath, dir: &FsPath, depth: u32, out: &mut Vec<Found>) -> std::io::Result<()> {
    // `<alg>/<2 hex>/<hex>/data`: nothing of ours is deeper.
    if depth > 4 {
        return Ok(());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let ty = entry.file_type()?;
        if ty.is_dir() {
            walk_dir(root, &path, depth + 1, out)?;
            continue;
        }
        let key = path
            .strip_prefix(root)
            .ok()
            .and_then(|k| k.to_str())
            .unwrap_or_default()
            .to_string();
        // Only `data` files are blobs (a crashed commit's temporary link is left to the
        // evictor's clean-up), but a link or special file is never ours, whatever its name.
        if ty.is_file() && !key.ends_with("/data") {
            continue;
        }
        let size = if ty.is_file() {
            entry.metadata()?.len()
        } else {
            0
        };
        out.push(Found {
            digest: digest_of(&key),
            key,
            size,
            not_a_file: !ty.is_file(),
        });
    }
    Ok(())
}

/// Lists the blobs of `engine`.
pub async fn list(engine: &StorageEngine) -> Result<Vec<Found>> {
    if let Some(root) = engine.local_root() {
        let root = root.to_path_buf();
        return tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk_dir(&root, &root.join(BLOBS), 0, &mut out).map(|()| out)
        })
        .await
        .map_err(std::io::Error::other)?
        .map_err(Error::Io);
    }
    let prefix = object_store::path::Path::from(BLOBS);
    let metas: Vec<object_store::ObjectMeta> = engine
        .store()
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| Error::object_store(engine.id(), e))?;
    Ok(metas
        .into_iter()
        .filter(|m| m.location.as_ref().ends_with("/data"))
        .map(|m| Found {
            key: m.location.to_string(),
            digest: digest_of(m.location.as_ref()),
            size: m.size,
            not_a_file: false,
        })
        .collect())
}

/// Hashes one blob; `Ok(None)` when it matches its digest, `Ok(Some(why))` when it must go.
async fn check(engine: &StorageEngine, f: &Found, read: &dyn Fn(u64)) -> Result<Option<String>> {
    if f.not_a_file {
        return Ok(Some("not a regular file".into()));
    }
    let Some(digest) = &f.digest else {
        return Ok(Some("not a blob path".into()));
    };
    let mut verifier = Verifier::new(digest);
    let mut size = 0u64;
    if let Some(root) = engine.local_root() {
        let (file, len) = match crate::fileio::open_beneath(root, &f.key) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Ok(Some(e.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let file = Arc::new(file);
        let mut chunks = crate::fileio::stream_range(file.clone(), 0, len);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            verifier.update(&chunk);
            size += chunk.len() as u64;
            read(chunk.len() as u64);
        }
        if verifier.finish() == *digest {
            // Good: record its size, so a hit can tell when it is later truncated.
            crate::fileio::record_size(&file, size);
            return Ok(None);
        }
    } else {
        let path = object_store::path::Path::from(f.key.as_str());
        let res = match engine.store().get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::object_store(engine.id(), e)),
        };
        let mut s = res.into_stream();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| Error::object_store(engine.id(), e))?;
            verifier.update(&chunk);
            size += chunk.len() as u64;
            read(chunk.len() as u64);
        }
        if verifier.finish() == *digest {
            return Ok(None);
        }
    }
    Ok(Some(format!("its {size} bytes do not hash to {digest}")))
}

/// Removes a bad blob (a link itself, never what it points at).
async fn remove(engine: &StorageEngine, key: &str) -> Result<()> {
    if let Some(root) = engine.local_root() {
        let path: PathBuf = root.join(key);
        return match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            // A special directory-like entry (not a link: those are files to unlink).
            Err(e) => Err(e.into()),
        };
    }
    match engine
        .store()
        .delete(&object_store::path::Path::from(key))
        .await
    {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::object_store(engine.id(), e)),
    }
}

/// Scrubs `blobs` (from [`list`]) of `engine`: `progress(found, bytes)` hears of every blob
/// checked and every chunk read.
pub async fn run(
    engine: &StorageEngine,
    blobs: &[Found],
    read: &dyn Fn(u64),
    checked: &dyn Fn(&Found, Option<&str>),
) -> Summary {
    let mut s = Summary::default();
    for f in blobs {
        s.blobs += 1;
        s.bytes += f.size;
        match check(engine, f, read).await {
            Ok(None) => checked(f, None),
            Ok(Some(why)) => {
                checked(f, Some(&why));
                match remove(engine, &f.key).await {
                    Ok(()) => {
                        s.removed.push((f.key.clone(), why));
                    }
                    Err(e) => s
                        .errors
                        .push((f.key.clone(), format!("{why}, but cannot remove it: {e}"))),
                }
            }
            Err(e) => {
                checked(f, Some(&e.to_string()));
                s.errors.push((f.key.clone(), e.to_string()));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_keys_name_their_digest() {
        let hex = "ab".repeat(32);
        let key = format!("{BLOBS}/sha256/ab/{hex}/data");
        assert_eq!(
            digest_of(&key).map(|d| d.to_string()),
            Some(format!("sha256:{hex}"))
        );
        assert!(digest_of(&format!("{BLOBS}/sha256/cd/{hex}/data")).is_none());
        assert!(digest_of(&format!("{BLOBS}/sha256/ab/{hex}/other")).is_none());
    }
}
