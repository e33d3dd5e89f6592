//! `emflow cache ls|show|path|verify`: the store as data for people and scripts.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::args::CacheCommand;
use super::{open_store_at, EXIT_FAILED};
use crate::commands;
use crate::console::{ReportMode, Reporter};

/// `emflow cache ...`: pure data on stdout (text or `--json`), messages on stderr.
pub(super) fn cache(store_flag: Option<&Path>, command: CacheCommand) -> anyhow::Result<u8> {
    let store = open_store_at(&existing_store(store_flag)?)?;
    match command {
        CacheCommand::Ls { json } => {
            let records = commands::cache_ls(&store)?;
            if json {
                let all: Vec<_> = records
                    .iter()
                    .map(|(key, r)| commands::record_json(&store, key, r))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(0);
            }
            for (key, r) in records {
                let size: u64 = r.outputs.values().map(|o| o.size).sum();
                println!(
                    "{}  {:<32} {:<12} {:>10}  {}",
                    crate::keys::short(&key),
                    r.stage_id,
                    r.kind,
                    crate::host::human_bytes(size),
                    r.finished_at
                );
            }
            Ok(0)
        }
        CacheCommand::Show { stage, json } => {
            let (key, record) = commands::cache_lookup(&store, &stage)?;
            if json {
                let value = commands::record_json(&store, &key, &record);
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(0);
            }
            println!("{}", serde_json::to_string_pretty(&record)?);
            for (name, entry) in &record.outputs {
                println!("output {name}: {}", store.artifact_path(entry).display());
            }
            Ok(0)
        }
        CacheCommand::Path { stage, output } => {
            let (_, record) = commands::cache_lookup(&store, &stage)?;
            let entry = record.outputs.get(&output).ok_or_else(|| {
                anyhow::anyhow!(
                    "stage {} has no output `{output}`; its outputs: {}",
                    record.stage_id,
                    record
                        .outputs
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            println!("{}", store.artifact_path(entry).display());
            Ok(0)
        }
        CacheCommand::Verify { repair } => {
            let reporter = Reporter::new(ReportMode::Human);
            let audit = commands::cache_verify(&store, &reporter, repair)?;
            let size = crate::host::human_bytes(audit.bytes);
            match (audit.damaged.len(), repair) {
                (0, _) => {
                    println!("all {} blobs ({size}) match their digests", audit.blobs);
                    Ok(0)
                }
                (n, true) => {
                    println!("{n} of {} blobs ({size}) were damaged and are removed; `emflow run` rebuilds the stages named above", audit.blobs);
                    Ok(0)
                }
                (n, false) => {
                    println!("{n} of {} blobs ({size}) are damaged", audit.blobs);
                    Ok(EXIT_FAILED)
                }
            }
        }
    }
}

/// A `cache` command reads a store; it has no manifest to place one next to, so the default is
/// `./.emflow`. Opening a store creates it, and a user who ran the README's quickstart from the
/// repository root (its store is `manifests/.emflow`, next to the manifest) and then typed
/// `emflow cache ls` there got an empty list and a new empty store. Refuse instead, naming the
/// stores in the folders below. `Ok` is the store's folder.
fn existing_store(store_flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let root = commands::store_location(store_flag, None);
    if root.join("records").is_dir() {
        return Ok(root);
    }
    let found = stores_below(Path::new("."));
    let hint = match found.as_slice() {
        [] => "pass the store of a run with --store DIR or EMFLOW_HOME".to_string(),
        [one] => format!(
            "the store of a run here is {0}: pass --store {0}",
            one.display()
        ),
        many => format!(
            "stores of runs here: {}; pass one with --store DIR",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    bail!(
        "no emflow store at {}: `emflow run` keeps a manifest's store in `.emflow/` next to the \
         manifest; {hint}",
        root.display()
    )
}

/// `.emflow` stores (folders with `records/`) in `dir` and its subfolders, two levels deep at
/// most (a `--store` that names the wrong folder gets `./.emflow` suggested too).
fn stores_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut frontier = vec![(dir.to_path_buf(), 0)];
    while let Some((folder, depth)) = frontier.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let (path, name) = (entry.path(), entry.file_name());
            if !path.is_dir() {
                continue;
            }
            if name == ".emflow" {
                if path.join("records").is_dir() {
                    found.push(path.strip_prefix(dir).unwrap_or(&path).to_path_buf());
                }
            } else if depth < 2 && !name.to_string_lossy().starts_with('.') && name != "target" {
                frontier.push((path, depth + 1));
            }
        }
    }
    found.sort();
    found
}
