//! Garbage collection by reachability, and disk usage.
//!
//! Roots are the stage keys the caller keeps (from lockfiles and recent runs). Everything a
//! kept record names stays; the rest goes, records first and then unreferenced content,
//! with the record removals made durable in between. So a crash in the middle of `gc` can
//! leave unreferenced content behind (freed next time), never a record whose outputs are
//! gone: a cache hit always finds its bytes.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::{CacheError, IoContext};
use crate::flock::KeyLock;
use crate::fsutil::{self, check_name};
use crate::record::EntryKind;
use crate::store::{
    is_digest, parse_record, Store, CHECKPOINTS, FILEMEMO, LOCKS, MEMO, OBJECTS, RECORDS,
    STAGE_INDEX, TMP, TREES,
};

/// What `gc` may remove.
#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    /// Only report what would be removed.
    pub dry_run: bool,
    /// Memo entries written longer ago than this are removed; `None` keeps every entry.
    pub keep_memo_newer_than: Option<Duration>,
}

/// What `gc` removed (or, with `dry_run`, would remove).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GcReport {
    pub dry_run: bool,
    pub records_kept: u64,
    /// Keys whose records were removed (unkept or corrupt).
    pub records_removed: Vec<String>,
    pub blobs_kept: u64,
    pub blobs_removed: u64,
    pub trees_kept: u64,
    pub trees_removed: u64,
    pub checkpoints_removed: u64,
    pub memo_entries_removed: u64,
    /// Bytes of everything removed, including leftovers of crashed runs in `tmp/`.
    pub bytes_freed: u64,
}

/// Entries and bytes of one area of the store.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct AreaSize {
    pub files: u64,
    pub bytes: u64,
}

/// Disk usage of a store, by area.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StoreSize {
    pub blobs: AreaSize,
    pub trees: AreaSize,
    pub records: AreaSize,
    pub memo: AreaSize,
    pub checkpoints: AreaSize,
    /// Staging folders of running stages and leftovers of crashed ones.
    pub tmp: AreaSize,
    pub total_bytes: u64,
}

impl Store {
    /// Keeps every record whose key is in `keep_keys` and the content they reference, and
    /// removes the rest. Refuses with [`CacheError::StoreBusy`] while a run holds the store.
    pub fn gc(
        &self,
        keep_keys: &BTreeSet<String>,
        opts: &GcOptions,
    ) -> Result<GcReport, CacheError> {
        let Some(_exclusive) = self.try_exclusive()? else {
            return Err(CacheError::StoreBusy {
                root: self.root().to_path_buf(),
            });
        };
        let dry = opts.dry_run;
        let mut report = GcReport {
            dry_run: dry,
            ..GcReport::default()
        };
        report.bytes_freed += self.clean_tmp(dry)?;

        // 1. Records: keep the roots, remove the rest (corrupt ones are useless: removed too).
        let mut reachable: HashSet<(EntryKind, String)> = HashSet::new();
        let mut kept_keys: HashSet<String> = HashSet::new();
        let records_dir = self.dir(RECORDS);
        for path in fsutil::list_dir(&records_dir)? {
            let Some(key) = fsutil::file_name(&path).and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if check_name("stage key", key).is_err() {
                continue;
            }
            let Some(bytes) = fsutil::read_optional(&path)? else {
                continue;
            };
            let parsed = parse_record(&path, &bytes);
            match parsed {
                Ok(record) if keep_keys.contains(key) => {
                    report.records_kept += 1;
                    kept_keys.insert(key.to_string());
                    for entry in record.outputs.values() {
                        reachable.insert((entry.kind, entry.digest.clone()));
                    }
                }
                // A record of a newer emflow is never ours to judge.
                Err(CacheError::NewerSchema { .. }) => {
                    report.records_kept += 1;
                    kept_keys.insert(key.to_string());
                }
                _ => {
                    report.records_removed.push(key.to_string());
                    report.bytes_freed += bytes.len() as u64;
                    if !dry {
                        fsutil::remove_file_if_present(&path)?;
                    }
                }
            }
        }
        if !dry {
            // Record removals must be durable before any content they named disappears.
            fsutil::fsync_dir(&records_dir)?;
        }

        // 2. Content nobody reachable names.
        for (area, kind) in [(OBJECTS, EntryKind::File), (TREES, EntryKind::Tree)] {
            for shard in fsutil::list_dir(&self.dir(area))? {
                for path in fsutil::list_dir(&shard)? {
                    let Some(digest) = fsutil::file_name(&path) else {
                        continue;
                    };
                    if !is_digest(digest) {
                        continue;
                    }
                    let keep = reachable.contains(&(kind, digest.to_string()));
                    match (kind, keep) {
                        (EntryKind::File, true) => report.blobs_kept += 1,
                        (EntryKind::Tree, true) => report.trees_kept += 1,
                        (EntryKind::File, false) => report.blobs_removed += 1,
                        (EntryKind::Tree, false) => report.trees_removed += 1,
                    }
                    if keep {
                        continue;
                    }
                    report.bytes_freed += fsutil::disk_usage(&path)?.0;
                    if !dry {
                        match kind {
                            EntryKind::File => {
                                fsutil::remove_file_if_present(&path)?;
                            }
                            EntryKind::Tree => self.discard(&path)?,
                        }
                    }
                }
            }
        }

        // 3. Checkpoints of keys nobody keeps and nobody is running.
        for path in fsutil::list_dir(&self.dir(CHECKPOINTS))? {
            let Some(key) = fsutil::file_name(&path) else {
                continue;
            };
            if check_name("stage key", key).is_err() || keep_keys.contains(key) {
                continue;
            }
            if self.lock_holder(key)?.is_some() {
                continue; // a stage is writing it right now
            }
            report.checkpoints_removed += 1;
            report.bytes_freed += fsutil::disk_usage(&path)?.0;
            if !dry {
                self.discard(&path)?;
            }
        }

        // 4. Old memo entries.
        if let Some(max_age) = opts.keep_memo_newer_than {
            let cutoff = SystemTime::now().checked_sub(max_age);
            for namespace in fsutil::list_dir(&self.dir(MEMO))? {
                for shard in fsutil::list_dir(&namespace)? {
                    for path in fsutil::list_dir(&shard)? {
                        let meta = fs::metadata(&path).at("inspect", &path)?;
                        let written = meta.modified().at("inspect", &path)?;
                        if cutoff.is_some_and(|c| written < c) {
                            report.memo_entries_removed += 1;
                            report.bytes_freed += meta.len();
                            if !dry {
                                fsutil::remove_file_if_present(&path)?;
                            }
                        }
                    }
                }
            }
        }

        if !dry {
            self.prune_bookkeeping(&kept_keys)?;
        }
        Ok(report)
    }

    /// Removes small bookkeeping files that point at nothing: memo entries of files that
    /// changed or vanished, stage-index entries of removed records, and free key locks.
    fn prune_bookkeeping(&self, kept_keys: &HashSet<String>) -> Result<(), CacheError> {
        for path in fsutil::list_dir(&self.dir(FILEMEMO))? {
            let live = fsutil::read_optional(&path)?.is_some_and(|b| Store::file_memo_is_live(&b));
            if !live {
                fsutil::remove_file_if_present(&path)?;
            }
        }
        for path in fsutil::list_dir(&self.dir(STAGE_INDEX))? {
            let target = fsutil::read_optional(&path)?
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("key").and_then(|k| k.as_str()).map(str::to_string));
            if !target.is_some_and(|key| kept_keys.contains(&key)) {
                fsutil::remove_file_if_present(&path)?;
            }
        }
        for path in fsutil::list_dir(&self.dir(LOCKS))? {
            let Some(key) = fsutil::file_name(&path).and_then(|n| n.strip_suffix(".lock")) else {
                continue;
            };
            if check_name("stage key", key).is_err() {
                continue;
            }
            // Unlinking while holding the lock is safe: a process that opened the old file
            // notices after locking that it is no longer at its path and retries.
            if let Some(lock) = KeyLock::acquire(path.clone(), false)? {
                fsutil::remove_file_if_present(&path)?;
                drop(lock);
            }
        }
        Ok(())
    }

    /// Disk usage of the store by area.
    pub fn size(&self) -> Result<StoreSize, CacheError> {
        let area = |name: &str| -> Result<AreaSize, CacheError> {
            let (bytes, files) = fsutil::disk_usage(&self.dir(name))?;
            Ok(AreaSize { files, bytes })
        };
        let mut size = StoreSize {
            blobs: area(OBJECTS)?,
            trees: area(TREES)?,
            records: area(RECORDS)?,
            memo: area(MEMO)?,
            checkpoints: area(CHECKPOINTS)?,
            tmp: area(TMP)?,
            total_bytes: 0,
        };
        size.total_bytes = fsutil::disk_usage(self.root())?.0;
        Ok(size)
    }
}
