//! `emflow verify`: re-executes cached stages in scratch space and compares the digests of
//! what they produce with their records.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use emflow_cache::{StageRecord, Store};
use serde_json::json;

use crate::console::{duration, Reporter, Word};
use crate::executor::{Executor, Wake};
use crate::job::{Job, JobMode, JobOutcome};
use crate::keys::short;
use crate::kind::Registry;
use crate::pipeline::Pipeline;
use crate::plan::{Planner, Resolved, State};
use crate::scheduler::{check_gpus, make_job};
use crate::slots::Slots;

/// One verified stage.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Verification {
    pub stage: String,
    /// `same`, `differs`, `failed`, `not_cached`, `damaged` (stored bytes no longer match).
    pub verdict: &'static str,
    /// Outputs whose digest differs: name -> (recorded, reproduced).
    pub differing: BTreeMap<String, (String, String)>,
    pub error: Option<String>,
}

/// The verdict on a stage whose stored outputs no longer match their record, reported.
fn damaged_verdict(
    reporter: &Reporter,
    id: &str,
    outputs: &[emflow_cache::DamagedOutput],
) -> Verification {
    let detail = crate::scheduler::damage_lines(outputs);
    reporter.status(
        Word::Damaged,
        id,
        "stored outputs are damaged",
        &format!("{detail}\n`emflow run` re-executes it and replaces the damaged blobs"),
    );
    let v = Verification {
        stage: id.to_string(),
        verdict: "damaged",
        differing: BTreeMap::new(),
        error: Some(detail),
    };
    reporter.event("verify", json!(v));
    v
}

/// `emflow verify`: re-executes cached stages without the cache, in scratch space, and
/// compares their output digests with the records.
pub fn verify(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Arc<Store>,
    executor: &dyn Executor,
    reporter: &Arc<Reporter>,
    selectors: &[String],
    jobs: usize,
) -> anyhow::Result<Vec<Verification>> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let selected = if selectors.is_empty() {
        (0..pipeline.stages.len()).collect()
    } else {
        planner.select(selectors)?
    };
    let gpus = crate::host::visible_gpus();
    check_gpus(&planner, &selected, gpus.len())?;
    let statuses = planner.statuses(None, &BTreeSet::new())?;
    let mut records: Vec<Option<StageRecord>> = vec![None; pipeline.stages.len()];
    for (i, s) in &statuses {
        records[*i] = s.record.clone();
    }
    let models = planner.available_models(&planner.models_used(0..pipeline.stages.len()))?;
    let mut results = Vec::new();
    let mut todo = Vec::new();
    let run_id = format!("verify-{}", crate::host::new_run_id());
    for (i, s) in statuses.iter().filter(|(i, _)| selected.contains(i)) {
        if let State::Damaged { outputs } = &s.state {
            results.push(damaged_verdict(reporter, &s.id, outputs));
            continue;
        }
        if records[*i].is_none() {
            results.push(not_cached_verdict(reporter, &s.id));
            continue;
        }
        if let Resolved::Ready { inputs, parts, key } = planner.resolve(*i, &records, &models)? {
            let (parts, mode) = (parts.to_value(), JobMode::Verify);
            let job = make_job(&run_id, pipeline, *i, inputs, parts, key, store, mode);
            todo.push((*i, job));
        }
    }
    let slots = Slots::new(jobs, crate::host::cores(), gpus);
    results.extend(run_jobs(
        pipeline, executor, reporter, slots, todo, &records,
    )?);
    Ok(results)
}

/// Runs the verify jobs as slots allow, in order, and returns each stage's verdict.
fn run_jobs(
    pipeline: &Pipeline,
    executor: &dyn Executor,
    reporter: &Arc<Reporter>,
    mut slots: Slots,
    mut todo: Vec<(usize, Job)>,
    records: &[Option<StageRecord>],
) -> anyhow::Result<Vec<Verification>> {
    let (tx, rx) = mpsc::channel();
    let wake = Wake(tx);
    let mut running = Vec::new();
    let mut results = Vec::new();
    todo.reverse();
    while !todo.is_empty() || !running.is_empty() {
        while let Some((i, _)) = todo.last() {
            let Some(alloc) = slots.try_take(&pipeline.stages[*i].resources) else {
                break;
            };
            let Some((i, mut job)) = todo.pop() else {
                break;
            };
            job.threads = alloc.cpus;
            job.device = alloc.device();
            job.gpu_ids = alloc.gpu_ids();
            let progress = reporter.stage_progress(&pipeline.stages[i].id);
            let handle = executor.submit(job, progress.clone(), wake.clone())?;
            running.push((i, handle, alloc, progress));
        }
        let _ = rx.recv_timeout(Duration::from_millis(100));
        let mut k = 0;
        while k < running.len() {
            let Some(finished) = running[k].1.poll().unwrap_or(None) else {
                k += 1;
                continue;
            };
            let (i, _, alloc, progress) = running.remove(k);
            slots.give_back(alloc);
            progress.finish();
            let id = pipeline.stages[i].id.clone();
            let recorded = records[i].as_ref();
            let v = verdict(reporter, id, finished.outcome, recorded);
            reporter.event("verify", json!(v));
            results.push(v);
        }
    }
    Ok(results)
}

/// The verdict on a stage that was not cached: nothing to compare with.
fn not_cached_verdict(reporter: &Reporter, id: &str) -> Verification {
    reporter.status(
        Word::Skip,
        id,
        "not cached: nothing to compare with; run `emflow run` first",
        "",
    );
    Verification {
        stage: id.to_string(),
        verdict: "not_cached",
        differing: BTreeMap::new(),
        error: None,
    }
}

/// The verdict on one re-execution, reported: `same`, `differs` or `failed`.
fn verdict(
    reporter: &Reporter,
    id: String,
    outcome: JobOutcome,
    record: Option<&StageRecord>,
) -> Verification {
    let (outputs, duration_s) = match outcome {
        JobOutcome::Verified {
            outputs,
            duration_s,
        } => (outputs, duration_s),
        JobOutcome::Failed { error } => {
            reporter.status(Word::Fail, &id, "re-execution failed", &error);
            return failed_verdict(id, error);
        }
        other => {
            let error = format!("unexpected outcome {other:?}");
            reporter.status(Word::Fail, &id, &error, "");
            return failed_verdict(id, error);
        }
    };
    let recorded = |name: &str| {
        record
            .and_then(|r| r.outputs.get(name))
            .map(|e| e.digest.clone())
            .unwrap_or_default()
    };
    let differing: BTreeMap<String, (String, String)> = outputs
        .iter()
        .filter_map(|(name, d)| {
            let old = recorded(name);
            (old != *d).then(|| (name.clone(), (old, d.clone())))
        })
        .collect();
    if differing.is_empty() {
        let detail = format!("{}  reproduces its recorded outputs", duration(duration_s));
        reporter.status(Word::Verify, &id, &detail, "");
    } else {
        let detail: Vec<String> = differing
            .iter()
            .map(|(n, (a, b))| {
                format!(
                    "output `{n}`: recorded {} but re-execution gave {}",
                    short(a),
                    short(b)
                )
            })
            .collect();
        reporter.status(Word::Differ, &id, "not reproducible", &detail.join("\n"));
    }
    Verification {
        stage: id,
        verdict: if differing.is_empty() {
            "same"
        } else {
            "differs"
        },
        differing,
        error: None,
    }
}

fn failed_verdict(id: String, error: String) -> Verification {
    Verification {
        stage: id,
        verdict: "failed",
        differing: BTreeMap::new(),
        error: Some(error),
    }
}
