//! `emflow gc`: what lock files and recent runs reach stays; the rest of the store goes.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::anyhow;
use emflow_cache::{GcOptions, GcReport, Store};

use crate::lockfile;

/// `emflow gc`: keeps what the lock files next to `manifests` and the last `keep_runs`
/// runs reach, removes everything else from the store.
pub fn gc(
    store: &Store,
    manifests: &[PathBuf],
    keep_runs: usize,
    dry_run: bool,
) -> anyhow::Result<(GcReport, usize)> {
    let mut keep = BTreeSet::new();
    for manifest in manifests {
        let path = lockfile::lock_path(manifest);
        let lock = lockfile::read(&path)?.ok_or_else(|| {
            anyhow!(
                "{} not found: `gc` keeps what lock files reach; run `emflow lock {}` first",
                path.display(),
                manifest.display()
            )
        })?;
        for section in lock.manifests.values() {
            keep.extend(section.stages.values().map(|s| s.key.clone()));
            keep.extend(section.models.values().filter_map(|m| m.fetch_key.clone()));
        }
    }
    let mut runs = store.runs()?;
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    let kept_runs = runs.len().min(keep_runs);
    for (_, run) in runs.iter().rev().take(keep_runs) {
        if let Some(keys) = run.get("keys").and_then(|k| k.as_array()) {
            keep.extend(keys.iter().filter_map(|k| k.as_str().map(String::from)));
        }
    }
    let report = store.gc(
        &keep,
        &GcOptions {
            dry_run,
            keep_memo_newer_than: None,
        },
    )?;
    if !dry_run {
        // Job folders (job files, stderr logs) of runs no longer kept.
        let kept: BTreeSet<&str> = runs
            .iter()
            .rev()
            .take(keep_runs)
            .map(|(id, _)| id.as_str())
            .collect();
        if let Ok(entries) = std::fs::read_dir(store.root().join("jobs")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !kept.contains(name.as_str()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    Ok((report, kept_runs))
}
