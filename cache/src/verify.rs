//! Reads that verify: a committed output counts only while its bytes still have the digest
//! its record names.
//!
//! Why this exists: a flipped byte, a truncated or deleted blob, or another blob's bytes put
//! in its place (a disk fault, a stray `cp`, a tool that "fixed" a file) used to be served as
//! cached, and every downstream stage was recorded as built from it (issue 19).
//!
//! How it stays cheap: [`Store::check_output`] hashes through the file memo
//! ([`Store::digest_path`]), which reuses a digest only while the file's whole stamp (size,
//! mtime, ctime, inode, device) is unchanged. Writing a byte, truncating, `chmod`-ing or
//! renaming another file over a blob all change that stamp, and ctime cannot be set back from
//! user space, so the first read after any such change hashes the bytes again; an untouched
//! blob costs one `stat` and one small memo read. [`Store::audit`] (`emflow verify --store`)
//! never uses the memo: it rehashes every byte of every blob.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::CacheError;
use crate::fsutil;
use crate::hash::{self, Digest};
use crate::record::{EntryKind, OutputEntry, StageRecord};
use crate::store::{is_digest, Store, OBJECTS, TREES};

/// What is wrong with one committed output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "damage", rename_all = "snake_case")]
pub enum Damage {
    /// The blob is not in the store.
    Missing,
    /// A file where a folder should be, or the other way round.
    WrongType,
    /// The bytes hash to another digest.
    Mismatch { found: Digest },
    /// The blob cannot be read (permissions, I/O error, a symlink planted inside a tree).
    Unreadable { error: String },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Missing => write!(f, "missing from the store"),
            Damage::WrongType => write!(f, "a file where a folder should be, or the reverse"),
            Damage::Mismatch { found } => write!(
                f,
                "its bytes hash to {}, not to the recorded digest",
                &found[..found.len().min(12)]
            ),
            Damage::Unreadable { error } => write!(f, "unreadable: {error}"),
        }
    }
}

/// One output of a record whose bytes are not what the record names.
#[derive(Clone, Debug, Serialize)]
pub struct DamagedOutput {
    /// The output's name in the record.
    pub output: String,
    /// Where the blob lives (or should live) in the store.
    pub path: PathBuf,
    pub damage: Damage,
}

/// One blob found damaged by [`Store::audit`].
#[derive(Clone, Debug, Serialize)]
pub struct DamagedBlob {
    pub path: PathBuf,
    pub kind: EntryKind,
    /// The digest its name claims.
    pub digest: Digest,
    pub damage: Damage,
    /// Records (stage ids) that name this blob among their outputs.
    pub stages: Vec<String>,
}

/// What [`Store::audit`] looked at.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditReport {
    pub blobs: u64,
    pub bytes: u64,
    pub damaged: Vec<DamagedBlob>,
    /// Damaged blobs moved out of the store (only with `repair`).
    pub removed: u64,
}

impl Store {
    /// Checks that the blob of `entry` holds exactly the bytes its digest names. `None`: intact.
    /// Only errors of the store itself (e.g. the memo folder) are `Err`; anything wrong with
    /// the blob is a [`Damage`].
    pub fn check_output(&self, entry: &OutputEntry) -> Result<Option<Damage>, CacheError> {
        let path = self.artifact_path(entry);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Some(Damage::Missing)),
            Err(e) => {
                return Ok(Some(Damage::Unreadable {
                    error: e.to_string(),
                }))
            }
        };
        let right_type = match entry.kind {
            EntryKind::File => meta.is_file(),
            EntryKind::Tree => meta.is_dir(),
        };
        if !right_type {
            return Ok(Some(Damage::WrongType));
        }
        let digest = match entry.kind {
            EntryKind::File => self.digest_file(&path),
            EntryKind::Tree => {
                hash::hash_tree(&path, |e| self.digest_file(&e.abs)).map(|t| t.digest)
            }
        };
        Ok(match digest {
            Ok(found) if found == entry.digest => None,
            Ok(found) => Some(Damage::Mismatch { found }),
            Err(e) => Some(Damage::Unreadable {
                error: e.to_string(),
            }),
        })
    }

    /// Every output of `record` whose blob is damaged; empty when the record can be served.
    pub fn damaged_outputs(&self, record: &StageRecord) -> Result<Vec<DamagedOutput>, CacheError> {
        let mut out = Vec::new();
        for (name, entry) in &record.outputs {
            if let Some(damage) = self.check_output(entry)? {
                out.push(DamagedOutput {
                    output: name.clone(),
                    path: self.artifact_path(entry),
                    damage,
                });
            }
        }
        Ok(out)
    }

    /// Rehashes every blob in `objects/` and `trees/` (no memo), reporting each whose bytes do
    /// not match its name, with the stages whose records name it. With `repair`, a damaged
    /// blob is moved out of the store, so that the next run re-executes the stages that made
    /// it instead of serving it. `progress(done_bytes, total_bytes)` is called as it goes.
    pub fn audit(
        &self,
        repair: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<AuditReport, CacheError> {
        let blobs = self.all_blobs()?;
        let total: u64 = blobs.iter().map(|b| b.2).sum();
        let mut report = AuditReport::default();
        let mut damaged = Vec::new();
        for (kind, path, size) in &blobs {
            let digest = fsutil::file_name(path).unwrap_or_default().to_string();
            let damage = if !is_digest(&digest) {
                // Not a blob name at all (a stray file): nothing can vouch for its bytes.
                Some(Damage::Mismatch {
                    found: String::new(),
                })
            } else {
                let found = match kind {
                    EntryKind::File => hash::hash_file(path),
                    EntryKind::Tree => {
                        hash::hash_tree(path, |e| hash::hash_file(&e.abs)).map(|t| t.digest)
                    }
                };
                match found {
                    Ok(found) if found == digest => None,
                    Ok(found) => Some(Damage::Mismatch { found }),
                    Err(e) => Some(Damage::Unreadable {
                        error: e.to_string(),
                    }),
                }
            };
            report.blobs += 1;
            report.bytes += size;
            progress(report.bytes, total);
            if let Some(damage) = damage {
                damaged.push(DamagedBlob {
                    path: path.clone(),
                    kind: *kind,
                    digest,
                    damage,
                    stages: Vec::new(),
                });
            }
        }
        if !damaged.is_empty() {
            for (_, record) in self.records()? {
                for entry in record.outputs.values() {
                    let path = self.artifact_path(entry);
                    for blob in damaged.iter_mut().filter(|b| b.path == path) {
                        if !blob.stages.contains(&record.stage_id) {
                            blob.stages.push(record.stage_id.clone());
                        }
                    }
                }
            }
        }
        if repair {
            for blob in &damaged {
                self.discard(&blob.path)?;
                report.removed += 1;
            }
        }
        report.damaged = damaged;
        Ok(report)
    }

    /// Every blob in the store: (kind, path, size on disk).
    fn all_blobs(&self) -> Result<Vec<(EntryKind, PathBuf, u64)>, CacheError> {
        let mut out = Vec::new();
        for (area, kind) in [(OBJECTS, EntryKind::File), (TREES, EntryKind::Tree)] {
            for shard in fsutil::list_dir(&self.dir(area))? {
                for path in fsutil::list_dir(&shard)? {
                    let size = fsutil::disk_usage(&path)?.0;
                    out.push((kind, path, size));
                }
            }
        }
        Ok(out)
    }

    /// Puts a blob that was checked (or found damaged) out of the way before a fresh copy of
    /// the same digest is renamed in. A file needs nothing (the rename replaces it in one
    /// step); a folder cannot be renamed over, so the damaged one is swapped out atomically.
    pub(crate) fn replace_damaged_tree(&self, fresh: &Path, dest: &Path) -> Result<(), CacheError> {
        // The folder being moved away must be writable for its `..` entry to change.
        fsutil::set_mode(dest, 0o755)?;
        fsutil::exchange(fresh, dest)?;
        // `fresh` now names the damaged folder.
        fsutil::remove_all(fresh)
    }
}
