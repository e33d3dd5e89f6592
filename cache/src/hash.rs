//! Content digests: blake3 of a file's bytes, and the canonical tree digest of a folder.
//!
//! A folder is hashed as the blake3 of a text listing, one line per entry sorted by relative
//! path (with `/`):
//!
//! ```text
//! dir "sub" 755 0 -
//! file "sub/w.bin" 644 1048576 <blake3 hex of the file>
//! ```
//!
//! Paths are JSON-quoted so no name can forge a line. Only the executable bit of a file is
//! recorded (as 755 or 644): owners, times and other permission bits differ between
//! machines and would break sharing. Folders get lines of their own so that empty folders
//! count. Symlinks are refused, because what they point at lives outside the tree.
//! The listing is hashed in blake3's key-derivation mode with its own context string, so a
//! tree digest can never equal the digest of a file, whatever the file holds.

use std::fs::{self, Metadata};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{CacheError, IoContext};

/// A blake3 digest as 64 lowercase hex characters.
pub type Digest = String;

/// Domain separation for tree listings (blake3 `derive_key` context); changing it changes
/// every tree digest, so it carries the scheme's version.
const TREE_CONTEXT: &str = "emflow 2026-11 canonical tree listing v1";

/// blake3 of a file's bytes. Large files are memory-mapped and hashed on all cores.
pub fn hash_file(path: &Path) -> Result<Digest, CacheError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path).at("hash", path)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Whether the owner may execute the file: the only permission bit a tree digest records.
pub(crate) fn is_executable(meta: &Metadata) -> bool {
    meta.permissions().mode() & 0o100 != 0
}

/// One entry of a folder being hashed.
#[derive(Debug, Clone)]
pub(crate) struct TreeEntry {
    /// Relative path with `/` separators.
    pub rel: String,
    pub abs: PathBuf,
    pub is_dir: bool,
    pub executable: bool,
    pub size: u64,
}

/// The digest of a folder and the total size of its files.
#[derive(Debug, Clone)]
pub(crate) struct TreeDigest {
    pub digest: Digest,
    pub size: u64,
    pub entries: Vec<TreeEntry>,
}

/// Lists every entry below `root`, sorted by relative path; refuses special files, and
/// symlinks unless `follow_file_links` (then links to files count as those files).
pub(crate) fn walk_tree(
    root: &Path,
    follow_file_links: bool,
) -> Result<Vec<TreeEntry>, CacheError> {
    let mut out = Vec::new();
    walk_into(root, "", follow_file_links, &mut out)?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

fn walk_into(
    dir: &Path,
    prefix: &str,
    follow_file_links: bool,
    out: &mut Vec<TreeEntry>,
) -> Result<(), CacheError> {
    for entry in fs::read_dir(dir).at("list", dir)? {
        let entry = entry.at("list", dir)?;
        let abs = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| CacheError::NonUtf8Name { path: abs.clone() })?;
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let mut meta = fs::symlink_metadata(&abs).at("inspect", &abs)?;
        if meta.file_type().is_symlink() {
            let target = fs::metadata(&abs).ok();
            match target {
                Some(t) if follow_file_links && t.is_file() => meta = t,
                _ => return Err(CacheError::Symlink { path: abs }),
            }
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            out.push(TreeEntry {
                rel: rel.clone(),
                abs: abs.clone(),
                is_dir: true,
                executable: true,
                size: 0,
            });
            walk_into(&abs, &rel, follow_file_links, out)?;
        } else if ft.is_file() {
            out.push(TreeEntry {
                rel,
                abs,
                is_dir: false,
                executable: is_executable(&meta),
                size: meta.len(),
            });
        } else {
            return Err(CacheError::UnsupportedFileType { path: abs });
        }
    }
    Ok(())
}

/// Hashes a folder that must not contain symlinks (a stage's output). `file_digest` hashes
/// one file (plain hashing, or a memoised lookup); it runs in parallel over the files.
pub(crate) fn hash_tree<F>(root: &Path, file_digest: F) -> Result<TreeDigest, CacheError>
where
    F: Fn(&TreeEntry) -> Result<Digest, CacheError> + Sync,
{
    digest_entries(walk_tree(root, false)?, file_digest)
}

/// Hashes a user's folder, where links to files are common (e.g. a Hugging Face cache
/// snapshot) and count as the files they point to. The digest equals that of a copy with
/// the links resolved.
pub(crate) fn hash_tree_following_file_links<F>(
    root: &Path,
    file_digest: F,
) -> Result<TreeDigest, CacheError>
where
    F: Fn(&TreeEntry) -> Result<Digest, CacheError> + Sync,
{
    digest_entries(walk_tree(root, true)?, file_digest)
}

fn digest_entries<F>(entries: Vec<TreeEntry>, file_digest: F) -> Result<TreeDigest, CacheError>
where
    F: Fn(&TreeEntry) -> Result<Digest, CacheError> + Sync,
{
    let digests: Vec<Option<Digest>> = entries
        .par_iter()
        .map(|e| {
            if e.is_dir {
                Ok(None)
            } else {
                file_digest(e).map(Some)
            }
        })
        .collect::<Result<_, _>>()?;
    let mut listing = String::with_capacity(entries.len() * 120);
    let mut size = 0;
    for (entry, digest) in entries.iter().zip(&digests) {
        let quoted = serde_json::to_string(&entry.rel).map_err(|source| CacheError::Serialize {
            what: "a file name",
            source,
        })?;
        match digest {
            None => listing.push_str(&format!("dir {quoted} 755 0 -\n")),
            Some(d) => {
                let mode = if entry.executable { 755 } else { 644 };
                listing.push_str(&format!("file {quoted} {mode} {} {d}\n", entry.size));
                size += entry.size;
            }
        }
    }
    Ok(TreeDigest {
        digest: blake3::Hasher::new_derive_key(TREE_CONTEXT)
            .update(listing.as_bytes())
            .finalize()
            .to_hex()
            .to_string(),
        size,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(dir: &Path) -> Digest {
        hash_tree(dir, |e| hash_file(&e.abs)).unwrap().digest
    }

    #[test]
    fn tree_digest_depends_on_content_names_and_exec_bit_only() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            fs::create_dir(root.join("sub")).unwrap();
            fs::write(root.join("sub/x.txt"), b"hello").unwrap();
            fs::write(root.join("top"), b"t").unwrap();
        }
        assert_eq!(digest_of(a.path()), digest_of(b.path()));

        fs::set_permissions(b.path().join("top"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            digest_of(a.path()),
            digest_of(b.path()),
            "non-exec bits are ignored"
        );

        fs::set_permissions(b.path().join("top"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(digest_of(a.path()), digest_of(b.path()), "exec bit counts");
        fs::set_permissions(b.path().join("top"), fs::Permissions::from_mode(0o644)).unwrap();

        fs::create_dir(b.path().join("empty")).unwrap();
        assert_ne!(
            digest_of(a.path()),
            digest_of(b.path()),
            "empty folders count"
        );
        fs::remove_dir(b.path().join("empty")).unwrap();

        fs::write(b.path().join("sub/x.txt"), b"hellO").unwrap();
        assert_ne!(digest_of(a.path()), digest_of(b.path()), "content counts");
    }

    #[test]
    fn tree_digest_differs_from_blob_digest_and_names_cannot_forge_lines() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        fs::write(a.path().join("a\" 644 1 x\nfile \"b"), b"1").unwrap();
        fs::write(b.path().join("a"), b"1").unwrap();
        fs::write(b.path().join("b"), b"1").unwrap();
        assert_ne!(digest_of(a.path()), digest_of(b.path()));
        let f = a.path().join("plain");
        fs::write(&f, b"").unwrap();
        let empty = tempfile::tempdir().unwrap();
        assert_ne!(hash_file(&f).unwrap(), digest_of(empty.path()));
    }

    #[test]
    fn symlinks_are_refused_with_their_path() {
        let a = tempfile::tempdir().unwrap();
        fs::write(a.path().join("real"), b"1").unwrap();
        std::os::unix::fs::symlink(a.path().join("real"), a.path().join("link")).unwrap();
        let err = hash_tree(a.path(), |e| hash_file(&e.abs)).unwrap_err();
        assert!(matches!(err, CacheError::Symlink { ref path } if path.ends_with("link")));
        assert!(err.to_string().contains("symbolic link"));
    }
}
