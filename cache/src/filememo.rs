//! Digests of users' files and folders, which are hashed in place and never copied into the
//! store, with a memo so that a large unchanged file is not rehashed on every run.
//!
//! The memo is keyed by the file's canonical path and its full stamp (size, mtime, ctime,
//! inode, device). ctime cannot be set from user space, so `touch -d` or a copy tool that
//! restores mtime still misses the memo after a content change; a miss always rehashes.
//! Like DVC's state database, the memo only ever *saves* work: staleness is never decided on
//! a timestamp alone. Files touched within `racy_window` of now are not memoised, because a
//! second write within the same timestamp tick would not change the stamp.

use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{CacheError, IoContext};
use crate::fsutil;
use crate::hash::{self, hash_file, Digest};
use crate::store::{Store, FILEMEMO, TMP};

/// Files smaller than this are rehashed every time: reading a memo entry costs about as much.
const MEMO_MIN_SIZE: u64 = 64 * 1024;
/// How often a file that changes while being hashed is retried before giving up.
const HASH_ATTEMPTS: u32 = 3;

/// Everything about a file's inode that a content change must alter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    device: u64,
}

impl Stamp {
    fn of(meta: &Metadata) -> Stamp {
        Stamp {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            inode: meta.ino(),
            device: meta.dev(),
        }
    }

    /// Whether the file changed so recently that a further write could keep this stamp.
    fn is_racy(&self, window_ns: i128) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        now - self.mtime_ns.max(self.ctime_ns) < window_ns
    }
}

#[derive(Serialize, Deserialize)]
struct FileMemoEntry {
    path: String,
    stamp: Stamp,
    digest: Digest,
}

impl Store {
    /// blake3 of a file, or the canonical tree digest of a folder, reusing memoised digests
    /// of large files whose stamp has not changed. A symlink given as `path` is followed;
    /// inside a folder, links to files are followed and links to folders are refused.
    pub fn digest_path(&self, path: &Path) -> Result<Digest, CacheError> {
        let meta = fs::metadata(path).at("inspect", path)?;
        if meta.is_dir() {
            let tree = hash::hash_tree_following_file_links(path, |e| self.digest_file(&e.abs))?;
            Ok(tree.digest)
        } else if meta.is_file() {
            self.digest_file(path)
        } else {
            Err(CacheError::UnsupportedFileType {
                path: path.to_path_buf(),
            })
        }
    }

    pub(crate) fn digest_file(&self, path: &Path) -> Result<Digest, CacheError> {
        let canonical = fs::canonicalize(path).at("resolve", path)?;
        let mut before = Stamp::of(&fs::metadata(&canonical).at("inspect", &canonical)?);
        if before.size < MEMO_MIN_SIZE {
            return hash_file(&canonical);
        }
        let Some(path_text) = canonical.to_str().map(str::to_string) else {
            return hash_file(&canonical);
        };
        let memo_path = self.file_memo_path(&path_text);
        if let Some(bytes) = fsutil::read_optional(&memo_path)? {
            if let Ok(entry) = serde_json::from_slice::<FileMemoEntry>(&bytes) {
                if entry.path == path_text
                    && entry.stamp == before
                    && crate::store::is_digest(&entry.digest)
                {
                    return Ok(entry.digest);
                }
            }
        }
        for _ in 0..HASH_ATTEMPTS {
            let digest = hash_file(&canonical)?;
            let after = Stamp::of(&fs::metadata(&canonical).at("inspect", &canonical)?);
            if after != before {
                before = after;
                continue;
            }
            let window = self.options.racy_window.as_nanos() as i128;
            if !after.is_racy(window) {
                let entry = FileMemoEntry {
                    path: path_text,
                    stamp: after,
                    digest: digest.clone(),
                };
                if let Ok(bytes) = serde_json::to_vec(&entry) {
                    // The memo only saves work; failing to write it must not fail the run.
                    if let Ok(tmp) = fsutil::write_tmp(&self.dir(TMP), &bytes, false) {
                        let _ = fsutil::rename_into_place(&tmp, &memo_path, false);
                    }
                }
            }
            return Ok(digest);
        }
        Err(CacheError::Unstable {
            path: canonical,
            attempts: HASH_ATTEMPTS,
        })
    }

    fn file_memo_path(&self, canonical: &str) -> PathBuf {
        let hash = blake3::hash(canonical.as_bytes()).to_hex();
        self.dir(FILEMEMO).join(format!("{}.json", &hash[..32]))
    }

    /// Whether a file memo entry describes a file that still exists with the same stamp.
    pub(crate) fn file_memo_is_live(bytes: &[u8]) -> bool {
        let Ok(entry) = serde_json::from_slice::<FileMemoEntry>(bytes) else {
            return false;
        };
        fs::metadata(&entry.path).is_ok_and(|m| Stamp::of(&m) == entry.stamp)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::time::Duration;

    use super::*;
    use crate::store::StoreOptions;

    fn store(root: &Path, racy_window: Duration) -> Store {
        Store::open_with(root, StoreOptions { racy_window }).unwrap()
    }

    /// Replaces the memoised digest of `path` by a sentinel, so that a later call shows
    /// whether it was answered from the memo (sentinel) or by rehashing (real digest).
    fn plant_sentinel(store: &Store, path: &Path) -> Digest {
        let canonical = fs::canonicalize(path).unwrap();
        let memo_path = store.file_memo_path(canonical.to_str().unwrap());
        let mut entry: FileMemoEntry =
            serde_json::from_slice(&fs::read(&memo_path).unwrap()).unwrap();
        entry.digest = "f".repeat(64);
        fs::write(&memo_path, serde_json::to_vec(&entry).unwrap()).unwrap();
        entry.digest
    }

    #[test]
    fn unchanged_file_reuses_the_memo_and_a_rewrite_with_old_mtime_is_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("store"), Duration::ZERO);
        let file = dir.path().join("weights.bin");
        fs::write(&file, vec![1u8; 200_000]).unwrap();
        let original_mtime = fs::metadata(&file).unwrap().modified().unwrap();
        let real = store.digest_path(&file).unwrap();
        assert_eq!(real, hash_file(&file).unwrap());

        let sentinel = plant_sentinel(&store, &file);
        assert_eq!(
            store.digest_path(&file).unwrap(),
            sentinel,
            "an unchanged stamp is reused"
        );

        // Same size, same inode, mtime forced back (`touch -d`): only ctime tells.
        let mut f = fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all(&[2u8; 10]).unwrap();
        f.set_modified(original_mtime).unwrap();
        drop(f);
        assert_eq!(
            fs::metadata(&file).unwrap().modified().unwrap(),
            original_mtime
        );
        let rehashed = store.digest_path(&file).unwrap();
        assert_ne!(rehashed, sentinel, "a changed ctime forces a rehash");
        assert_ne!(rehashed, real);
        assert_eq!(rehashed, hash_file(&file).unwrap());
    }

    #[test]
    fn a_file_replaced_by_another_inode_is_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("store"), Duration::ZERO);
        let file = dir.path().join("data.jsonl");
        fs::write(&file, vec![b'a'; 100_000]).unwrap();
        store.digest_path(&file).unwrap();
        let sentinel = plant_sentinel(&store, &file);
        let replacement = dir.path().join("new");
        fs::write(&replacement, vec![b'b'; 100_000]).unwrap();
        fs::rename(&replacement, &file).unwrap();
        let digest = store.digest_path(&file).unwrap();
        assert_ne!(digest, sentinel);
        assert_eq!(digest, hash_file(&file).unwrap());
    }

    #[test]
    fn recently_written_files_are_not_memoised() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("store"), Duration::from_secs(3600));
        let file = dir.path().join("fresh.bin");
        File::create(&file)
            .unwrap()
            .write_all(&[7u8; 100_000])
            .unwrap();
        store.digest_path(&file).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join("store/filememo"))
                .unwrap()
                .count(),
            0
        );
    }
}
