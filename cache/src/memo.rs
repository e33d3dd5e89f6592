//! Two small persistent maps: the memo of expensive calls (judge verdicts and the like), and
//! the run journal the engine writes (so `gc` can keep what recent runs reached).
//!
//! A memo entry is one file named by the blake3 of its key, so concurrent writers never
//! share a file and the last rename wins; values for one key must be interchangeable.

use std::path::PathBuf;

use crate::error::CacheError;
use crate::fsutil::{self, check_name};
use crate::store::{Store, MEMO, RUNS, TMP};

impl Store {
    fn memo_path(&self, namespace: &str, key: &[u8]) -> PathBuf {
        let hash = blake3::hash(key).to_hex();
        self.dir(MEMO)
            .join(namespace)
            .join(&hash[..2])
            .join(hash.as_str())
    }

    /// The value stored under (`namespace`, `key`), if any.
    pub fn memo_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        check_name("memo namespace", namespace)?;
        fsutil::read_optional(&self.memo_path(namespace, key))
    }

    /// Stores `value` under (`namespace`, `key`) atomically; last writer wins.
    pub fn memo_put(&self, namespace: &str, key: &[u8], value: &[u8]) -> Result<(), CacheError> {
        check_name("memo namespace", namespace)?;
        let path = self.memo_path(namespace, key);
        if let Some(parent) = path.parent() {
            fsutil::ensure_dir(parent)?;
        }
        // Not fsynced: a memo entry lost to a power cut costs one repeated call, while an
        // fsync per judge verdict would cost minutes over an evaluation.
        let tmp = fsutil::write_tmp(&self.dir(TMP), value, false)?;
        fsutil::rename_into_place(&tmp, &path, false)
    }

    /// Removes every memo entry of the namespaces named `prefix` or `prefix.*` (e.g. `judge`
    /// takes `judge.v1`): the calls are made again when next needed. Returns the entries and
    /// bytes removed (with `dry_run`, that would be). Refuses with [`CacheError::StoreBusy`]
    /// while a run holds the store.
    pub fn drop_memo_namespaces(
        &self,
        prefix: &str,
        dry_run: bool,
    ) -> Result<(u64, u64), CacheError> {
        check_name("memo namespace", prefix)?;
        let Some(_exclusive) = self.try_exclusive()? else {
            return Err(CacheError::StoreBusy {
                root: self.root().to_path_buf(),
            });
        };
        let (mut entries, mut bytes) = (0, 0);
        for namespace in fsutil::list_dir(&self.dir(MEMO))? {
            let Some(name) = fsutil::file_name(&namespace) else {
                continue;
            };
            let dotted = name
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
            if !dotted {
                continue;
            }
            let (b, n) = fsutil::disk_usage(&namespace)?;
            entries += n;
            bytes += b;
            if !dry_run {
                self.discard(&namespace)?;
            }
        }
        Ok((entries, bytes))
    }

    /// Records (or replaces) the journal of one run, atomically.
    pub fn write_run(&self, run_id: &str, run: &serde_json::Value) -> Result<(), CacheError> {
        check_name("run id", run_id)?;
        let bytes = serde_json::to_vec_pretty(run).map_err(|source| CacheError::Serialize {
            what: "a run journal",
            source,
        })?;
        let path = self.dir(RUNS).join(format!("{run_id}.json"));
        fsutil::atomic_write(&self.dir(TMP), &path, &bytes)
    }

    /// Every run journal, sorted by run id.
    pub fn runs(&self) -> Result<Vec<(String, serde_json::Value)>, CacheError> {
        let mut out = Vec::new();
        for path in fsutil::list_dir(&self.dir(RUNS))? {
            let Some(id) = fsutil::stored_name(&path, ".json", "run id") else {
                continue;
            };
            let Some(bytes) = fsutil::read_optional(&path)? else {
                continue;
            };
            let value = serde_json::from_slice(&bytes).map_err(|source| CacheError::Corrupt {
                path: path.clone(),
                source,
            })?;
            out.push((id.to_string(), value));
        }
        Ok(out)
    }
}
