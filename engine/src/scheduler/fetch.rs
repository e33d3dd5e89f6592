//! Models named by `pip:`/`hf:` sources, fetched into the store before any stage runs and
//! recorded under their fetch key like a stage, so `gc` and the lock treat them alike.

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::{anyhow, Context as _};
use emflow_cache::StageRecord;
use serde_json::json;

use super::lines::intact_record;
use super::RunEnv;
use crate::console::{duration, Word};
use crate::job::error_chain;
use crate::keys::model_fetch_key;
use crate::plan::{model_source, model_stage_id, ModelSource, Planner};

/// Fetches every `pip:`/`hf:` model the selection reads that is not in the store yet.
/// Returns the fetch keys the selection uses (for the run record).
pub(super) fn fetch_models(
    planner: &mut Planner,
    selection: &BTreeSet<usize>,
    env: &RunEnv,
) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    for name in planner.models_used(selection.iter().copied()) {
        let Some(decl) = planner.pipeline.models.get(&name) else {
            continue;
        };
        let ModelSource::Fetched { scheme } = model_source(decl, &planner.pipeline.manifest_dir)
        else {
            continue;
        };
        let key = model_fetch_key(&decl.source);
        keys.push(key.clone());
        let store = env.store.as_ref();
        let id = model_stage_id(&name);
        if intact_record(planner, &env.reporter, &id, &key)?.is_some() {
            continue;
        }
        let fetcher = env.registry.fetcher(&scheme).ok_or_else(|| {
            anyhow!(
                "model `{name}`: this emflow binary cannot fetch `{scheme}:` sources; download the model yourself and point `models.{name}.source` at the local file or folder"
            )
        })?;
        let progress = env.reporter.stage_progress(&id);
        let clock = Instant::now();
        let _lock = store.lock(&key)?;
        if store
            .record(&key)?
            .is_some_and(|r| store.damaged_outputs(&r).is_ok_and(|d| d.is_empty()))
        {
            progress.finish();
            continue;
        }
        let staging = store.staging(&key)?;
        let result = fetcher.fetch(
            &decl.source,
            &staging.path().join("model"),
            progress.as_ref(),
        );
        progress.finish();
        if let Err(err) = result {
            let err = err.context(format!("fetching model `{name}` from {}", decl.source));
            env.reporter.status(
                Word::Fail,
                &id,
                &duration(clock.elapsed().as_secs_f64()),
                &error_chain(&err),
            );
            return Err(err);
        }
        let record = StageRecord {
            schema: emflow_cache::RECORD_SCHEMA,
            key: key.clone(),
            stage_id: id.clone(),
            kind: "model_fetch".into(),
            key_parts: json!({ "schema": crate::keys::KEY_SCHEMA, "kind": "model_fetch", "source": decl.source }),
            started_at: crate::host::now_rfc3339(),
            finished_at: crate::host::now_rfc3339(),
            duration_s: clock.elapsed().as_secs_f64(),
            host: crate::host::hostname(),
            engine_version: crate::keys::EMFLOW_VERSION.into(),
            ..StageRecord::default()
        };
        store
            .commit(staging, &key, record)
            .with_context(|| format!("storing fetched model `{name}`"))?;
        env.reporter.status(
            Word::Fetch,
            &id,
            &duration(clock.elapsed().as_secs_f64()),
            "",
        );
        env.reporter
            .event("fetched", json!({ "model": name, "key": key }));
    }
    Ok(keys)
}
