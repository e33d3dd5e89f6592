//! `emflow cache ls|show|path|verify`: the store as data for people and scripts.

use std::path::Path;

use super::args::CacheCommand;
use super::{open_store, EXIT_FAILED};
use crate::commands;
use crate::console::{ReportMode, Reporter};

/// `emflow cache ...`: pure data on stdout (text or `--json`), messages on stderr.
pub(super) fn cache(store_flag: Option<&Path>, command: CacheCommand) -> anyhow::Result<u8> {
    let store = open_store(store_flag, None)?;
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
