//! `emflow.lock`: the keys and output digests a manifest produced, committed next to it so
//! CI can check that the manifest still produces exactly that (`emflow check`) and `gc`
//! knows what to keep.
//!
//! One lock file per folder, with one section per manifest file in it (several manifests
//! often share a folder). JSON with every map sorted, so a re-lock with no change rewrites
//! identical bytes and a changed key shows as a small diff in review. Each stage carries
//! its key parts, so `check` can say *why* a key moved without any store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const LOCK_FILE: &str = "emflow.lock";
pub const LOCK_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LockFile {
    pub emflow_lock: u32,
    /// Manifest file name -> its locked state.
    pub manifests: BTreeMap<String, ManifestLock>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ManifestLock {
    pub profile: Option<String>,
    pub stages: BTreeMap<String, LockedStage>,
    pub models: BTreeMap<String, LockedModel>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockedStage {
    pub kind: String,
    pub key: String,
    /// Output name -> content digest.
    pub outputs: BTreeMap<String, String>,
    pub key_parts: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockedModel {
    pub source: String,
    pub digest: String,
    /// The fetch record's key, for fetched (`pip:`, `hf:`) models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_key: Option<String>,
}

/// Path of the lock file next to `manifest`.
pub fn lock_path(manifest: &Path) -> PathBuf {
    manifest.parent().unwrap_or(Path::new(".")).join(LOCK_FILE)
}

/// The section name of `manifest` in its lock file.
pub fn section_name(manifest: &Path) -> String {
    manifest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads a lock file; `None` when there is none.
pub fn read(path: &Path) -> anyhow::Result<Option<LockFile>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let lock: LockFile = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not a valid emflow lock file; delete it and run `emflow lock` again",
            path.display()
        )
    })?;
    if lock.emflow_lock != LOCK_VERSION {
        return Err(anyhow!("{} has lock format {}; this emflow writes format {LOCK_VERSION}: run `emflow lock` again", path.display(), lock.emflow_lock));
    }
    Ok(Some(lock))
}

/// Writes `lock` with sorted maps (also inside key parts), atomically.
pub fn write(path: &Path, lock: &LockFile) -> anyhow::Result<()> {
    let value = sorted(serde_json::to_value(lock)?);
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    let tmp = path.with_extension(format!("lock.tmp.{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("moving {} into place", path.display()))?;
    Ok(())
}

/// `value` with every object's keys in sorted order.
pub fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}
