//! The store: layout, staging folders, the commit protocol, records, locks and checkpoints.
//!
//! Commit protocol (the reason nothing half-done is ever visible):
//! 1. a stage writes its outputs as direct children of a private staging folder in `tmp/`;
//! 2. each child is hashed, made read-only, fsynced and *renamed* into `objects/` (files) or
//!    `trees/` (folders) under its digest; a digest already present is reused (dedupe);
//! 3. the record `records/<key>.json` is written last (tmp + fsync + rename).
//!
//! A crash before step 3 leaves at most unreferenced objects (reused by the next commit of the
//! same bytes, freed by `gc`) and a staging folder whose owner lock the kernel has released
//! (removed by the next `open` or `gc`). Nothing needs unlocking and nothing is "incomplete".

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dirpool::DirPool;
use crate::error::{CacheError, IoContext};
use crate::flock::{self, KeyLock, LockHolder, Mode, StorePin};
use crate::fsutil::{self, check_name, unique_suffix};
use crate::hash::{self, hash_file, Digest};
use crate::record::{EntryKind, OutputEntry, StageRecord, RECORD_SCHEMA};
use crate::verify::Damage;

pub(crate) const OBJECTS: &str = "objects";
pub(crate) const TREES: &str = "trees";
pub(crate) const RECORDS: &str = "records";
pub(crate) const STAGE_INDEX: &str = "stage-index";
pub(crate) const MEMO: &str = "memo";
pub(crate) const LOCKS: &str = "locks";
pub(crate) const TMP: &str = "tmp";
pub(crate) const CHECKPOINTS: &str = "checkpoints";
pub(crate) const RUNS: &str = "runs";
pub(crate) const FILEMEMO: &str = "filememo";
const LAYOUT: [&str; 10] = [
    OBJECTS,
    TREES,
    RECORDS,
    STAGE_INDEX,
    MEMO,
    LOCKS,
    TMP,
    CHECKPOINTS,
    RUNS,
    FILEMEMO,
];
/// The lock file `gc` takes exclusively and commits and [`StorePin`]s take shared. Its name
/// starts with '.', which no stage key may, so it cannot collide with a key's lock.
const STORE_LOCK: &str = ".store";

/// Settings of a store handle that are not part of its on-disk state.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// A file whose mtime or ctime is this close to "now" is hashed but its digest is not
    /// memoised: a write in the same timestamp tick could go unseen (git's "racy clean").
    pub racy_window: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            racy_window: Duration::from_secs(2),
        }
    }
}

/// A content-addressed store rooted at one folder. Cheap to clone; safe to share between
/// threads and between processes (every mutation is atomic on disk).
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    pub(crate) options: StoreOptions,
    /// Empty folders this process reuses for staging, checkpoints and scratch.
    pool: std::sync::Arc<DirPool>,
}

/// A private folder where one execution of a key writes its outputs, one direct child per
/// output. Removed on drop unless committed.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    owner: PathBuf,
    key: String,
    owner_lock: Option<File>,
    finished: bool,
    pool: std::sync::Arc<DirPool>,
}

impl Staging {
    /// The folder to write outputs into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The key this folder was created for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Forgets the folder as a crashed process would: the owner lock is released, nothing is
    /// removed. Only for crash tests.
    fn abandon(mut self) {
        self.finished = true;
        self.owner_lock.take();
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: whatever stays behind is removed by the next `open` or `gc`.
            self.pool.give(&self.dir);
            let _ = fs::remove_file(&self.owner);
        }
    }
}

/// A private, empty folder for a stage's temporary files (a command's working directory).
/// Emptied and kept for reuse on drop; left behind by a crash, it is removed by the next
/// `open` or `gc` like any entry of a dead process in `tmp/`.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
    pool: std::sync::Arc<DirPool>,
}

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.pool.give(&self.dir);
    }
}

/// What the stage index stores per stage instance.
#[derive(Serialize, Deserialize)]
struct StageIndexEntry {
    stage_id: String,
    key: String,
}

impl Store {
    /// Opens or creates a store at `root`. Creating the same store from several processes at
    /// once is safe. Removes staging folders left by dead processes.
    pub fn open(root: &Path) -> Result<Store, CacheError> {
        Store::open_with(root, StoreOptions::default())
    }

    /// [`Store::open`] with explicit options.
    pub fn open_with(root: &Path, options: StoreOptions) -> Result<Store, CacheError> {
        for dir in LAYOUT {
            fsutil::ensure_dir(&root.join(dir))?;
        }
        let store = Store {
            root: root.to_path_buf(),
            options,
            pool: std::sync::Arc::new(DirPool::new(root.join(TMP))),
        };
        // Leftovers never block a run, so a failure to tidy up is not a failure to open.
        let _ = store.clean_tmp(false);
        Ok(store)
    }

    /// The folder the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    // ----- staging and commit -----

    /// A fresh private staging folder for one execution of `key`.
    pub fn staging(&self, key: &str) -> Result<Staging, CacheError> {
        check_name("stage key", key)?;
        let tmp = self.dir(TMP);
        loop {
            let name = format!("stage-{key}-{}", unique_suffix());
            let owner = tmp.join(format!("{name}.owner"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&owner)
                .at("create staging owner file", &owner)?;
            flock::flock(&file, Mode::Exclusive, true, &owner)?;
            // A concurrent cleaner may have taken the lock between create and flock, found it
            // "free" and unlinked it: then this lock guards nothing and we start over.
            let held = file.metadata().at("inspect", &owner)?;
            match fs::metadata(&owner) {
                Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => {}
                _ => continue,
            }
            let dir = tmp.join(&name);
            self.pool.take(&dir)?;
            return Ok(Staging {
                dir,
                owner,
                key: key.to_string(),
                owner_lock: Some(file),
                finished: false,
                pool: self.pool.clone(),
            });
        }
    }

    /// Moves the staged outputs into the store and writes the record for `key` last.
    /// Returns the record as stored.
    pub fn commit(
        &self,
        staging: Staging,
        key: &str,
        record: StageRecord,
    ) -> Result<StageRecord, CacheError> {
        self.commit_inner(staging, key, record, None)
    }

    /// [`Store::commit`] that stops dead at its `crash_at`-th durable step, leaving the disk
    /// exactly as a `kill -9` there would. For crash tests; see [`Store::commit_steps`].
    #[doc(hidden)]
    pub fn commit_crashing_at(
        &self,
        staging: Staging,
        key: &str,
        record: StageRecord,
        crash_at: u32,
    ) -> Result<StageRecord, CacheError> {
        self.commit_inner(staging, key, record, Some(crash_at))
    }

    fn commit_inner(
        &self,
        mut staging: Staging,
        key: &str,
        mut record: StageRecord,
        crash_at: Option<u32>,
    ) -> Result<StageRecord, CacheError> {
        check_name("stage key", key)?;
        if staging.key != key {
            return Err(CacheError::StagingKeyMismatch {
                path: staging.dir.clone(),
                staged_for: staging.key.clone(),
                key: key.to_string(),
            });
        }
        let _pin = self.pin()?;
        let mut step = 0u32;
        let reached = |step: &mut u32| -> Result<(), CacheError> {
            *step += 1;
            if crash_at == Some(*step) {
                return Err(CacheError::SimulatedCrash { step: *step });
            }
            Ok(())
        };
        let result = (|| {
            let mut outputs = BTreeMap::new();
            for child in fsutil::list_dir(&staging.dir)? {
                let name = fsutil::file_name(&child)
                    .ok_or_else(|| CacheError::NonUtf8Name {
                        path: child.clone(),
                    })?
                    .to_string();
                let entry = self.store_child(&child, &mut || reached(&mut step))?;
                outputs.insert(name, entry);
            }
            record.schema = RECORD_SCHEMA;
            record.key = key.to_string();
            record.outputs = outputs;
            let bytes =
                serde_json::to_vec_pretty(&record).map_err(|source| CacheError::Serialize {
                    what: "a stage record",
                    source,
                })?;
            let tmp = fsutil::write_tmp(&self.dir(TMP), &bytes, true)?;
            reached(&mut step)?;
            fsutil::rename_into_place(&tmp, &self.record_path(key), true)?;
            reached(&mut step)?;
            self.write_stage_index(&record.stage_id, key)?;
            reached(&mut step)?;
            Ok(record)
        })();
        match result {
            Err(CacheError::SimulatedCrash { step }) => {
                staging.abandon();
                Err(CacheError::SimulatedCrash { step })
            }
            Err(e) => Err(e),
            Ok(record) => {
                staging.finished = true;
                self.pool.give(&staging.dir);
                let _ = fs::remove_file(&staging.owner);
                Ok(record)
            }
        }
    }

    /// Moves one staged output into the store; `reached` marks each durable step.
    fn store_child(
        &self,
        child: &Path,
        reached: &mut dyn FnMut() -> Result<(), CacheError>,
    ) -> Result<OutputEntry, CacheError> {
        let meta = fs::symlink_metadata(child).at("inspect", child)?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            return Err(CacheError::Symlink {
                path: child.to_path_buf(),
            });
        }
        if ft.is_file() {
            let digest = hash_file(child)?;
            let entry = OutputEntry {
                digest,
                kind: EntryKind::File,
                size: meta.len(),
            };
            let dest = self.artifact_path(&entry);
            // Dedupe only onto intact bytes: a damaged blob of the same digest is replaced by
            // the rename below, in one step (issue 19: `--force` used to keep a flipped byte).
            if self.check_output(&entry)?.is_none() {
                fs::remove_file(child).at("remove deduplicated", child)?;
                reached()?;
                return Ok(entry);
            }
            let mode = if hash::is_executable(&meta) {
                0o555
            } else {
                0o444
            };
            fsutil::set_mode(child, mode)?;
            File::open(child)
                .and_then(|f| f.sync_all())
                .at("fsync", child)?;
            reached()?;
            let shard = dest.parent().unwrap_or(&self.root).to_path_buf();
            fsutil::ensure_dir(&shard)?;
            fs::rename(child, &dest).at("move into the store", &dest)?;
            fsutil::fsync_dir(&shard)?;
            reached()?;
            Ok(entry)
        } else if ft.is_dir() {
            let tree = hash::hash_tree(child, |e| hash_file(&e.abs))?;
            let entry = OutputEntry {
                digest: tree.digest.clone(),
                kind: EntryKind::Tree,
                size: tree.size,
            };
            let dest = self.artifact_path(&entry);
            let damage = self.check_output(&entry)?;
            if damage.is_none() {
                fsutil::remove_all(child)?;
                reached()?;
                return Ok(entry);
            }
            seal_tree(child, &tree.entries)?;
            reached()?;
            let shard = dest.parent().unwrap_or(&self.root).to_path_buf();
            fsutil::ensure_dir(&shard)?;
            if damage == Some(Damage::WrongType) {
                // A file squats where the folder belongs: no reader can use it either way.
                fsutil::remove_all(&dest)?;
            } else if damage != Some(Damage::Missing) {
                fsutil::set_mode(child, 0o755)?;
                self.replace_damaged_tree(child, &dest)?;
                fsutil::set_mode(&dest, 0o555)?;
                fsutil::fsync_dir(&shard)?;
                reached()?;
                return Ok(entry);
            }
            match fs::rename(child, &dest) {
                Ok(()) => {}
                // Someone committed the same tree a moment ago: theirs is complete, use it.
                Err(e)
                    if dest.is_dir()
                        && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) =>
                {
                    fsutil::remove_all(child)?;
                    reached()?;
                    return Ok(entry);
                }
                Err(e) => return Err(CacheError::io("move into the store", &dest, e)),
            }
            // Renaming a folder needs it writable, so its own mode is set only now.
            fsutil::set_mode(&dest, 0o555)?;
            fsutil::fsync_dir(&shard)?;
            reached()?;
            Ok(entry)
        } else {
            Err(CacheError::UnsupportedFileType {
                path: child.to_path_buf(),
            })
        }
    }

    /// Read-only path of a committed output.
    pub fn artifact_path(&self, entry: &OutputEntry) -> PathBuf {
        let area = match entry.kind {
            EntryKind::File => OBJECTS,
            EntryKind::Tree => TREES,
        };
        self.content_path(area, &entry.digest)
    }

    pub(crate) fn content_path(&self, area: &str, digest: &str) -> PathBuf {
        let shard = digest.get(..2).unwrap_or("__");
        self.root.join(area).join(shard).join(digest)
    }

    // ----- records -----

    pub(crate) fn record_path(&self, key: &str) -> PathBuf {
        self.dir(RECORDS).join(format!("{key}.json"))
    }

    /// The record of `key`, `None` if absent; an error if it is corrupt.
    pub fn record(&self, key: &str) -> Result<Option<StageRecord>, CacheError> {
        check_name("stage key", key)?;
        let path = self.record_path(key);
        match fsutil::read_optional(&path)? {
            None => Ok(None),
            Some(bytes) => parse_record(&path, &bytes).map(Some),
        }
    }

    /// Every record in the store, sorted by key.
    pub fn records(&self) -> Result<Vec<(String, StageRecord)>, CacheError> {
        let mut out = Vec::new();
        for path in fsutil::list_dir(&self.dir(RECORDS))? {
            let Some(key) = fsutil::stored_name(&path, ".json", "stage key") else {
                continue;
            };
            // A record removed by a concurrent gc between listing and reading is just gone.
            if let Some(bytes) = fsutil::read_optional(&path)? {
                out.push((key.to_string(), parse_record(&path, &bytes)?));
            }
        }
        Ok(out)
    }

    /// The most recent record of a stage instance (e.g. `sft_warmup[seed=0]`), committed or
    /// reused, with its key.
    pub fn last_record_for_stage(
        &self,
        stage_id: &str,
    ) -> Result<Option<(String, StageRecord)>, CacheError> {
        let path = self.stage_index_path(stage_id);
        if let Some(bytes) = fsutil::read_optional(&path)? {
            if let Ok(entry) = serde_json::from_slice::<StageIndexEntry>(&bytes) {
                if entry.stage_id == stage_id && check_name("stage key", &entry.key).is_ok() {
                    if let Some(record) = self.record(&entry.key)? {
                        return Ok(Some((entry.key, record)));
                    }
                }
            }
        }
        // The index is a hint (gc may have removed what it pointed at): fall back to a scan.
        let newest = self
            .records()?
            .into_iter()
            .filter(|(_, r)| r.stage_id == stage_id)
            .max_by(|(_, a), (_, b)| a.finished_at.cmp(&b.finished_at));
        Ok(newest)
    }

    /// Marks `key` as the latest record of `stage_id` (the engine calls this when it reuses a
    /// cached result, so that `status` compares against what was used last). Cheap when
    /// nothing changes.
    pub fn note_stage_record(&self, stage_id: &str, key: &str) -> Result<(), CacheError> {
        check_name("stage key", key)?;
        let path = self.stage_index_path(stage_id);
        if let Some(bytes) = fsutil::read_optional(&path)? {
            if let Ok(entry) = serde_json::from_slice::<StageIndexEntry>(&bytes) {
                if entry.stage_id == stage_id && entry.key == key {
                    return Ok(());
                }
            }
        }
        self.write_stage_index(stage_id, key)
    }

    fn write_stage_index(&self, stage_id: &str, key: &str) -> Result<(), CacheError> {
        let entry = StageIndexEntry {
            stage_id: stage_id.to_string(),
            key: key.to_string(),
        };
        let bytes = serde_json::to_vec(&entry).map_err(|source| CacheError::Serialize {
            what: "a stage index entry",
            source,
        })?;
        // Only a hint, so no fsync: a lost update is repaired by the fallback scan.
        let tmp = fsutil::write_tmp(&self.dir(TMP), &bytes, false)?;
        fsutil::rename_into_place(&tmp, &self.stage_index_path(stage_id), false)
    }

    pub(crate) fn stage_index_path(&self, stage_id: &str) -> PathBuf {
        let hash = blake3::hash(stage_id.as_bytes()).to_hex();
        self.dir(STAGE_INDEX).join(format!("{}.json", &hash[..32]))
    }

    // ----- locks -----

    pub(crate) fn lock_path(&self, key: &str) -> PathBuf {
        self.dir(LOCKS).join(format!("{key}.lock"))
    }

    /// Blocks until this process holds the exclusive lock of `key`. A lock whose holder died
    /// is free at once (the kernel releases it).
    pub fn lock(&self, key: &str) -> Result<KeyLock, CacheError> {
        check_name("stage key", key)?;
        let path = self.lock_path(key);
        match KeyLock::acquire(path.clone(), true)? {
            Some(lock) => Ok(lock),
            None => Err(CacheError::io(
                "lock",
                &path,
                std::io::Error::other("a blocking lock returned without the lock"),
            )),
        }
    }

    /// The lock of `key`, or `None` when another holder has it.
    pub fn try_lock(&self, key: &str) -> Result<Option<KeyLock>, CacheError> {
        check_name("stage key", key)?;
        KeyLock::acquire(self.lock_path(key), false)
    }

    /// Who holds the lock of `key` now (for "waiting for ..." messages), `None` if free.
    pub fn lock_holder(&self, key: &str) -> Result<Option<LockHolder>, CacheError> {
        check_name("stage key", key)?;
        flock::current_holder(&self.lock_path(key))
    }

    /// A shared hold on the store that makes `gc` wait: hold it for a whole run.
    pub fn pin(&self) -> Result<StorePin, CacheError> {
        StorePin::acquire(&self.dir(LOCKS).join(STORE_LOCK))
    }

    pub(crate) fn try_exclusive(&self) -> Result<Option<File>, CacheError> {
        flock::try_exclusive(&self.dir(LOCKS).join(STORE_LOCK))
    }

    // ----- checkpoints -----

    /// The checkpoint folder of `key` (created). It survives crashes and is kept until
    /// [`Store::remove_checkpoint`] or `gc`.
    pub fn checkpoint_dir(&self, key: &str) -> Result<PathBuf, CacheError> {
        check_name("stage key", key)?;
        let dir = self.dir(CHECKPOINTS).join(key);
        if !dir.is_dir() {
            match self.pool.take(&dir) {
                Ok(()) => {}
                // Another caller made it in between: a folder that exists is what was asked.
                Err(_) if dir.is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(dir)
    }

    /// Removes the checkpoint folder of `key` (after a successful commit). Fine if absent.
    /// An empty one (the common case: the stage never checkpointed) is kept for reuse.
    pub fn remove_checkpoint(&self, key: &str) -> Result<(), CacheError> {
        check_name("stage key", key)?;
        let dir = self.dir(CHECKPOINTS).join(key);
        if fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_none()) {
            self.pool.give(&dir);
            return Ok(());
        }
        self.discard(&dir)
    }

    /// A private, empty scratch folder in `tmp/` (see [`Scratch`]).
    pub fn scratch(&self) -> Result<Scratch, CacheError> {
        let dir = self.dir(TMP).join(format!("scratch-{}", unique_suffix()));
        self.pool.take(&dir)?;
        Ok(Scratch {
            dir,
            pool: self.pool.clone(),
        })
    }

    /// Makes a folder disappear atomically (rename into `tmp/`), then deletes it. A crash
    /// during the delete leaves only a `trash-` entry that the next cleanup removes.
    pub(crate) fn discard(&self, path: &Path) -> Result<(), CacheError> {
        let trash = self.dir(TMP).join(format!("trash-{}", unique_suffix()));
        match fs::rename(path, &trash) {
            Ok(()) => fsutil::remove_all(&trash),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::io("move to trash", path, e)),
        }
    }

    /// Removes what dead processes left in `tmp/`: staging folders whose owner lock is free,
    /// and temporary files and trash of processes that no longer exist. Returns bytes freed.
    pub(crate) fn clean_tmp(&self, dry_run: bool) -> Result<u64, CacheError> {
        let tmp = self.dir(TMP);
        let entries = fsutil::list_dir(&tmp)?;
        let names: std::collections::BTreeSet<String> = entries
            .iter()
            .filter_map(|p| fsutil::file_name(p).map(str::to_string))
            .collect();
        let mut freed = 0;
        for path in &entries {
            let Some(name) = fsutil::file_name(path) else {
                continue;
            };
            let remove = if let Some(dir_name) = name.strip_suffix(".owner") {
                let Ok(file) = File::open(path) else { continue };
                if !flock::flock(&file, Mode::Exclusive, false, path)? {
                    continue; // its owner is alive
                }
                let dir = tmp.join(dir_name);
                freed += fsutil::disk_usage(&dir)?.0;
                if !dry_run {
                    fsutil::remove_all(&dir)?;
                    fsutil::remove_file_if_present(path)?;
                }
                continue;
            } else if name.starts_with("stage-") {
                // A staging folder whose owner file is gone was being removed when its
                // remover died (the owner file is created first and removed last).
                !names.contains(&format!("{name}.owner"))
            } else if let Some(rest) = ["write-", "trash-", "spare-", "scratch-"]
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix))
            {
                let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
                pid.is_none_or(|pid| !fsutil::pid_alive(pid))
            } else {
                false
            };
            if remove {
                freed += fsutil::disk_usage(path)?.0;
                if !dry_run {
                    fsutil::remove_all(path)?;
                }
            }
        }
        Ok(freed)
    }
}

/// Makes every entry of a staged tree read-only (folders 0555, files 0444 or 0555) and
/// fsyncs the files, deepest first, leaving the top folder itself for after the rename.
fn seal_tree(root: &Path, entries: &[hash::TreeEntry]) -> Result<(), CacheError> {
    entries.par_iter().filter(|e| !e.is_dir).try_for_each(|e| {
        fsutil::set_mode(&e.abs, if e.executable { 0o555 } else { 0o444 })?;
        File::open(&e.abs)
            .and_then(|f| f.sync_all())
            .at("fsync", &e.abs)
    })?;
    for e in entries.iter().rev().filter(|e| e.is_dir) {
        File::open(&e.abs)
            .and_then(|f| f.sync_all())
            .at("fsync folder", &e.abs)?;
        fsutil::set_mode(&e.abs, 0o555)?;
    }
    fsutil::fsync_dir(root)
}

pub(crate) fn parse_record(path: &Path, bytes: &[u8]) -> Result<StageRecord, CacheError> {
    let record: StageRecord =
        serde_json::from_slice(bytes).map_err(|source| CacheError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    if record.schema > RECORD_SCHEMA {
        return Err(CacheError::NewerSchema {
            path: path.to_path_buf(),
            found: record.schema,
            supported: RECORD_SCHEMA,
        });
    }
    for (name, entry) in &record.outputs {
        if !is_digest(&entry.digest) {
            return Err(CacheError::InvalidRecord {
                path: path.to_path_buf(),
                reason: format!(
                    "output {name:?} has digest {:?}, not 64 hex characters",
                    entry.digest
                ),
            });
        }
    }
    Ok(record)
}

/// Whether `s` looks like a blake3 hex digest.
pub(crate) fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Digest helper re-exported for the engine's own use: blake3 of bytes as hex.
pub fn digest_bytes(bytes: &[u8]) -> Digest {
    blake3::hash(bytes).to_hex().to_string()
}
