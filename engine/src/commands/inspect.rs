//! `emflow cache ls|show|path|verify`: finding records by what a user names, a record as
//! scripts read it, and the full audit of every blob.

use std::sync::Arc;

use anyhow::anyhow;
use emflow_cache::{StageRecord, Store};
use serde_json::json;

use crate::console::{Reporter, Word};

/// `emflow cache verify`: rehashes every blob in the store (no memo) with a progress bar,
/// prints each damaged one with the stages whose records name it, and with `repair` moves
/// them out of the store so that the next `emflow run` rebuilds those stages. Returns the
/// audit; the caller decides the exit code.
pub fn cache_verify(
    store: &Store,
    reporter: &Arc<Reporter>,
    repair: bool,
) -> anyhow::Result<emflow_cache::AuditReport> {
    use crate::context::Progress as _;
    let progress = reporter.stage_progress("store");
    let mut started = false;
    let mut last = 0;
    let audit = store.audit(repair, &mut |done, total| {
        if !started {
            progress.phase("hashing every blob", total, "bytes");
            started = true;
        }
        progress.inc(done - last);
        last = done;
    });
    progress.finish();
    let audit = audit?;
    for blob in &audit.damaged {
        let stages = if blob.stages.is_empty() {
            "no record names it".to_string()
        } else {
            format!("output of {}", blob.stages.join(", "))
        };
        let fate = if repair {
            "removed; `emflow run` rebuilds it"
        } else {
            "`emflow cache verify --repair` removes it so that `emflow run` rebuilds it"
        };
        reporter.status(
            Word::Damaged,
            &blob.path.display().to_string(),
            &format!("{}: {stages}", blob.damage),
            fate,
        );
        reporter.event("damaged_blob", json!(blob));
    }
    Ok(audit)
}

/// `emflow cache ls`: every record, newest last.
pub fn cache_ls(store: &Store) -> anyhow::Result<Vec<(String, StageRecord)>> {
    let mut records = store.records()?;
    records.sort_by(|a, b| a.1.finished_at.cmp(&b.1.finished_at).then(a.0.cmp(&b.0)));
    Ok(records)
}

/// The record a user names: a stage instance id (`grpo[domain=medical,seed=0]`), a stage name
/// with exactly one recorded instance (`report`), or a key prefix. For an instance, its most
/// recent record. Errors say what matched instead and how to narrow it.
pub fn cache_lookup(store: &Store, what: &str) -> anyhow::Result<(String, StageRecord)> {
    if let Some(found) = store.last_record_for_stage(what)? {
        return Ok(found);
    }
    let records = store.records()?;
    let mut instances: Vec<&str> = records
        .iter()
        .map(|(_, r)| r.stage_id.as_str())
        .filter(|id| id.split('[').next() == Some(what))
        .collect();
    instances.sort_unstable();
    instances.dedup();
    match instances.as_slice() {
        [one] => {
            let one = one.to_string();
            return store
                .last_record_for_stage(&one)?
                .ok_or_else(|| anyhow!("the record of `{one}` vanished; run the command again"));
        }
        [] => {}
        many => {
            return Err(anyhow!(
                "stage `{what}` has {} recorded instances: {}; name one, e.g. `{}`",
                many.len(),
                many.iter().take(10).copied().collect::<Vec<_>>().join(", "),
                many[0]
            ))
        }
    }
    let by_key: Vec<&(String, StageRecord)> = records
        .iter()
        .filter(|(k, _)| k.starts_with(what))
        .collect();
    match by_key.as_slice() {
        [one] => Ok((one.0.clone(), one.1.clone())),
        [] => Err(anyhow!(
            "no stage instance, stage name or key prefix `{what}` in the store; `emflow cache ls` lists them"
        )),
        many => Err(anyhow!(
            "{} records have keys starting with `{what}`; give more digits",
            many.len()
        )),
    }
}

/// A record as scripts read it: the record's own fields plus each output's path in the store.
pub fn record_json(store: &Store, key: &str, record: &StageRecord) -> serde_json::Value {
    let outputs: serde_json::Map<String, serde_json::Value> = record
        .outputs
        .iter()
        .map(|(name, entry)| {
            (
                name.clone(),
                json!({
                    "path": store.artifact_path(entry),
                    "digest": entry.digest,
                    "kind": entry.kind,
                    "size": entry.size,
                }),
            )
        })
        .collect();
    let mut value = json!(record);
    if let Some(map) = value.as_object_mut() {
        map.insert("key".into(), json!(key));
        map.insert("outputs".into(), serde_json::Value::Object(outputs));
    }
    value
}
