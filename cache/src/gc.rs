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
use crate::fsutil;
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

/// What the kept records hold on to: their keys and the content their outputs name.
#[derive(Default)]
struct Kept {
    keys: HashSet<String>,
    reachable: HashSet<(EntryKind, String)>,
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
        let kept = self.gc_records(keep_keys, &mut report)?;
        self.gc_content(&kept.reachable, &mut report)?;
        self.gc_checkpoints(keep_keys, &mut report)?;
        if let Some(max_age) = opts.keep_memo_newer_than {
            self.gc_memo(max_age, &mut report)?;
        }
        if !dry {
            self.prune_bookkeeping(&kept.keys)?;
        }
        Ok(report)
    }

    /// Phase 1, records: keeps the roots and removes the rest (corrupt ones are useless:
    /// removed too). Returns what the kept records name.
    fn gc_records(
        &self,
        keep_keys: &BTreeSet<String>,
        report: &mut GcReport,
    ) -> Result<Kept, CacheError> {
        let mut kept = Kept::default();
        let records_dir = self.dir(RECORDS);
        for path in fsutil::list_dir(&records_dir)? {
            let Some(key) = fsutil::stored_name(&path, ".json", "stage key") else {
                continue;
            };
            let Some(bytes) = fsutil::read_optional(&path)? else {
                continue;
            };
            match parse_record(&path, &bytes) {
                Ok(record) if keep_keys.contains(key) => {
                    report.records_kept += 1;
                    kept.keys.insert(key.to_string());
                    for entry in record.outputs.values() {
                        kept.reachable.insert((entry.kind, entry.digest.clone()));
                    }
                }
                // A record of a newer emflow is never ours to judge.
                Err(CacheError::NewerSchema { .. }) => {
                    report.records_kept += 1;
                    kept.keys.insert(key.to_string());
                }
                _ => {
                    report.records_removed.push(key.to_string());
                    report.bytes_freed += bytes.len() as u64;
                    if !report.dry_run {
                        fsutil::remove_file_if_present(&path)?;
                    }
                }
            }
        }
        if !report.dry_run {
            // Record removals must be durable before any content they named disappears.
            fsutil::fsync_dir(&records_dir)?;
        }
        Ok(kept)
    }

    /// Phase 2: blobs and trees that no kept record names.
    fn gc_content(
        &self,
        reachable: &HashSet<(EntryKind, String)>,
        report: &mut GcReport,
    ) -> Result<(), CacheError> {
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
                    if !report.dry_run {
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
        Ok(())
    }

    /// Phase 3: checkpoints of keys nobody keeps and nobody is running.
    fn gc_checkpoints(
        &self,
        keep_keys: &BTreeSet<String>,
        report: &mut GcReport,
    ) -> Result<(), CacheError> {
        for path in fsutil::list_dir(&self.dir(CHECKPOINTS))? {
            let Some(key) = fsutil::stored_name(&path, "", "stage key") else {
                continue;
            };
            if keep_keys.contains(key) {
                continue;
            }
            if self.lock_holder(key)?.is_some() {
                continue; // a stage is writing it right now
            }
            report.checkpoints_removed += 1;
            report.bytes_freed += fsutil::disk_usage(&path)?.0;
            if !report.dry_run {
                self.discard(&path)?;
            }
        }
        Ok(())
    }

    /// Phase 4: memo entries written longer ago than `max_age`.
    fn gc_memo(&self, max_age: Duration, report: &mut GcReport) -> Result<(), CacheError> {
        let cutoff = SystemTime::now().checked_sub(max_age);
        for namespace in fsutil::list_dir(&self.dir(MEMO))? {
            for shard in fsutil::list_dir(&namespace)? {
                for path in fsutil::list_dir(&shard)? {
                    let meta = fs::metadata(&path).at("inspect", &path)?;
                    let written = meta.modified().at("inspect", &path)?;
                    if cutoff.is_some_and(|c| written < c) {
                        report.memo_entries_removed += 1;
                        report.bytes_freed += meta.len();
                        if !report.dry_run {
                            fsutil::remove_file_if_present(&path)?;
                        }
                    }
                }
            }
        }
        Ok(())
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
            if fsutil::stored_name(&path, ".lock", "stage key").is_none() {
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
