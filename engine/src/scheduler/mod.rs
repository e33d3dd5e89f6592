//! `emflow run`: plan, fetch models, then schedule stages as their inputs appear.
//!
//! Keys are resolved lazily: a stage is looked up in the store only once every upstream
//! has a record, because its key contains their output digests. A cache hit settles the
//! stage at once and may unblock more; a miss becomes a [`Job`] that waits for free slots
//! (`--jobs`, CPUs, GPU ids) and goes to the [`Executor`]. A failure stops new work (the
//! running stages finish and commit) unless `--keep-going`; Ctrl-C cancels running stages
//! (they may checkpoint) and stops. Every run writes a run record to the store, which `gc`
//! uses to keep what recent runs used.
//!
//! [`run_pipeline`] reads as its phases: [`plan`] (select, key what can be keyed, check
//! budgets), the dry run or [`fetch`] of models, [`execute`] (the scheduling loop), and
//! the summary (run record, footer, where the reports are). What a run prints about
//! stages lives in [`lines`].

mod execute;
mod fetch;
mod lines;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context as _};
use emflow_cache::{StageRecord, Store};
use serde::Serialize;
use serde_json::json;

use crate::artifact::ArtifactType;
use crate::console::Reporter;
use crate::executor::Executor;
use crate::job::{Job, JobArtifact, JobMode};
use crate::judge_cost::BeforeRun;
use crate::kind::Registry;
use crate::pipeline::Pipeline;
use crate::plan::{Planner, StageStatus, State};

pub use lines::{damage_lines, plan_line};
pub(crate) use lines::{profile_suffix, PlanCounts};

/// Options of one `emflow run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Stages running at once.
    pub jobs: usize,
    pub keep_going: bool,
    pub dry_run: bool,
    /// Stage names or instance ids to run (with their missing upstream); empty = all.
    pub only: Vec<String>,
    /// Stage names or instance ids to rerun even if cached.
    pub force: Vec<String>,
    /// Stages this run executes ask their judges again instead of reading the memo.
    pub refresh_memo: bool,
    /// GPU ids stages may use (see [`crate::host::visible_gpus`]).
    pub gpus: Vec<String>,
    /// Cores the CPU budget allows.
    pub cpus: usize,
    /// Judge prices and the `--max-judge-calls`/`--max-judge-cost` limits.
    pub judge: crate::judge_cost::JudgeBudget,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: crate::host::cores(),
            keep_going: false,
            dry_run: false,
            only: Vec::new(),
            force: Vec::new(),
            refresh_memo: false,
            gpus: crate::host::visible_gpus(),
            cpus: crate::host::cores(),
            judge: Default::default(),
        }
    }
}

/// How each stage of a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageResult {
    /// Its key was in the store already.
    Cached,
    /// Another process committed it while this run waited for the key lock.
    Reused,
    Ran,
    Failed,
    /// Not run: an upstream failed, or the run stopped.
    Skipped,
    /// Saved a checkpoint and stopped on request.
    Interrupted,
    /// Dry run: would run.
    WouldRun,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    /// Instance id -> result, in topological order.
    pub stages: Vec<(String, StageResult)>,
    /// Failed instance id -> error chain.
    pub errors: BTreeMap<String, String>,
    pub elapsed_s: f64,
    /// Set when Ctrl-C (or a signal) stopped the run.
    pub interrupted: bool,
}

impl RunSummary {
    pub fn count(&self, result: StageResult) -> usize {
        self.stages.iter().filter(|(_, r)| *r == result).count()
    }

    pub fn ok(&self) -> bool {
        !self.interrupted
            && self.stages.iter().all(|(_, r)| {
                matches!(
                    r,
                    StageResult::Cached
                        | StageResult::Reused
                        | StageResult::Ran
                        | StageResult::WouldRun
                )
            })
    }

    /// The summary as a `--json` event body: stages as `{stage, result}` objects.
    pub fn to_json(&self) -> serde_json::Value {
        let stages: Vec<_> = self
            .stages
            .iter()
            .map(|(id, r)| json!({ "stage": id, "result": r }))
            .collect();
        json!({
            "run_id": self.run_id,
            "stages": stages,
            "errors": self.errors,
            "elapsed_s": self.elapsed_s,
            "interrupted": self.interrupted,
        })
    }

    pub fn result_of(&self, id: &str) -> Option<&StageResult> {
        self.stages.iter().find(|(s, _)| s == id).map(|(_, r)| r)
    }
}

/// Everything `run_pipeline` needs besides the pipeline.
pub struct RunEnv<'a> {
    pub registry: &'a Registry,
    pub store: Arc<Store>,
    pub executor: &'a dyn Executor,
    pub reporter: Arc<Reporter>,
    /// Set asynchronously (Ctrl-C) to stop the run.
    pub stop: Arc<AtomicBool>,
}

/// Runs the selected stages of `pipeline` that are not cached, as their inputs appear, and
/// writes the run record. A dry run stops after the plan and says what would run.
pub fn run_pipeline(
    pipeline: &Pipeline,
    env: &RunEnv,
    opts: &RunOptions,
) -> anyhow::Result<RunSummary> {
    let clock = Instant::now();
    let run_id = crate::host::new_run_id();
    let started_at = crate::host::now_rfc3339();
    let mut plan = plan(pipeline, env, opts)?;
    lines::header(pipeline, env, &run_id, &plan.statuses, opts.dry_run);
    if opts.dry_run {
        return dry_run(plan, env, opts, run_id, clock);
    }
    crate::judge_cost::before_run(
        BeforeRun::Guard,
        &mut plan.planner,
        &plan.statuses,
        &opts.judge,
        &env.reporter,
    )?;
    if let Some(shortfall) = plan.gpu_shortfall.take() {
        return Err(shortfall);
    }
    plan.memory.print(&env.reporter);
    plan.memory.check()?;
    let model_keys = fetch::fetch_models(&mut plan.planner, &plan.selection, env)?;
    let executed = execute::Schedule::new(plan, env, opts, &run_id)?.run()?;
    summarise(
        pipeline,
        env,
        executed,
        model_keys,
        (run_id, started_at, clock),
    )
}

/// What the plan phase found: the stages this run covers and the state of each.
struct RunPlan<'a> {
    planner: Planner<'a>,
    /// The selected stages (`--only` and their upstream), by index.
    selection: BTreeSet<usize>,
    /// Selected stages `--force` reruns even when cached.
    forced: BTreeSet<usize>,
    /// Why this machine cannot run the selection (too few GPUs), if it cannot.
    gpu_shortfall: Option<anyhow::Error>,
    /// The GPU stages' memory estimates and whether they fit.
    memory: crate::memory::MemoryPlan,
    statuses: Vec<(usize, StageStatus)>,
}

/// Phase 1: select the stages, key what can be keyed and find what is cached.
fn plan<'a>(
    pipeline: &'a Pipeline,
    env: &'a RunEnv,
    opts: &RunOptions,
) -> anyhow::Result<RunPlan<'a>> {
    let mut planner = Planner::new(pipeline, env.registry, env.store.as_ref())?;
    let selection = if opts.only.is_empty() {
        (0..pipeline.stages.len()).collect()
    } else {
        planner.dag.upstream_closure(planner.select(&opts.only)?)
    };
    let forced: BTreeSet<usize> = planner
        .select(&opts.force)?
        .intersection(&selection)
        .copied()
        .collect();
    // A dry run plans on any machine (a laptop checking the `paper` profile before sending it
    // to a GPU node); it says what a real run here would refuse instead of failing. A real
    // run refuses after the judge budget check, which holds on any machine.
    let gpu_shortfall = check_gpus(&planner, &selection, opts.gpus.len()).err();
    let memory = crate::memory::MemoryPlan::of(&planner, &selection, crate::host::gpu_memory);
    let statuses = planner.statuses(Some(&selection), &forced)?;
    Ok(RunPlan {
        planner,
        selection,
        forced,
        gpu_shortfall,
        memory,
        statuses,
    })
}

/// `--dry-run`: each stage's state and reasons, the judge calls, and what a real run here
/// would refuse; nothing runs.
fn dry_run(
    mut plan: RunPlan,
    env: &RunEnv,
    opts: &RunOptions,
    run_id: String,
    clock: Instant,
) -> anyhow::Result<RunSummary> {
    for (_, s) in &plan.statuses {
        plan_line(&env.reporter, s);
    }
    crate::judge_cost::before_run(
        BeforeRun::Report,
        &mut plan.planner,
        &plan.statuses,
        &opts.judge,
        &env.reporter,
    )?;
    if let Some(e) = plan.gpu_shortfall {
        env.reporter.line(&format!(
            "\nnote: a real run on this machine would stop first: {e}"
        ));
    }
    // A plan that cannot fit its declared GPU memory is refused here too: the dry run is
    // where a user checks a profile before sending it to a GPU node.
    plan.memory.print(&env.reporter);
    plan.memory.check()?;
    let stages = plan
        .statuses
        .iter()
        .map(|(_, s)| {
            let result = if matches!(s.state, State::Cached) {
                StageResult::Cached
            } else {
                StageResult::WouldRun
            };
            (s.id.clone(), result)
        })
        .collect();
    let summary = RunSummary {
        run_id,
        stages,
        errors: BTreeMap::new(),
        elapsed_s: clock.elapsed().as_secs_f64(),
        interrupted: false,
    };
    if env.reporter.is_json() {
        env.reporter.event("summary", summary.to_json());
    }
    Ok(summary)
}

/// Last phase: the summary, the run record `gc` reads, the footer, and where the reports
/// this run produced or reused are.
fn summarise(
    pipeline: &Pipeline,
    env: &RunEnv,
    executed: execute::Executed,
    mut model_keys: Vec<String>,
    (run_id, started_at, clock): (String, String, Instant),
) -> anyhow::Result<RunSummary> {
    let execute::Executed {
        order,
        records,
        results,
        errors,
    } = executed;
    let interrupted = env.stop.load(Ordering::Relaxed);
    let result_of = |i: usize| results.get(&i).cloned().unwrap_or(StageResult::Skipped);
    let summary = RunSummary {
        run_id: run_id.clone(),
        stages: order
            .iter()
            .map(|&i| (pipeline.stages[i].id.clone(), result_of(i)))
            .collect(),
        errors,
        elapsed_s: clock.elapsed().as_secs_f64(),
        interrupted,
    };
    let key_of = |i: usize| records[i].as_ref().map(|r| r.key.clone());
    let mut keys: Vec<String> = order.iter().filter_map(|&i| key_of(i)).collect();
    keys.append(&mut model_keys);
    let run_record = json!({
        "run_id": run_id,
        "manifest": pipeline.manifest_path,
        "profile": pipeline.profile,
        "started_at": started_at,
        "finished_at": crate::host::now_rfc3339(),
        "executor": env.executor.name(),
        "host": crate::host::hostname(),
        "engine_version": crate::keys::EMFLOW_VERSION,
        "stages": order.iter().map(|&i| (pipeline.stages[i].id.clone(), json!({
            "key": key_of(i),
            "result": results.get(&i),
        }))).collect::<serde_json::Map<_, _>>(),
        "keys": keys,
    });
    env.store
        .write_run(&run_id, &run_record)
        .context("writing the run record")?;
    lines::footer(&env.reporter, &summary);
    point_at_reports(pipeline, env, &order, &records);
    Ok(summary)
}

/// Points at what a person opens next: every output declared [`ArtifactType::Report`] that
/// this run produced or reused, refreshed in the manifest's results folder
/// ([`crate::commands::results_dir`]), a path to bookmark (its `index.html` when it has one).
/// Where that folder cannot be written, the store's copy is shown instead.
fn point_at_reports(
    pipeline: &Pipeline,
    env: &RunEnv,
    order: &[usize],
    records: &[Option<StageRecord>],
) {
    let results = crate::commands::results_dir(pipeline);
    let is_report = |ty: ArtifactType| ty == ArtifactType::Report;
    for &i in order {
        let Some(record) = records[i].as_ref() else {
            continue;
        };
        let stage = &pipeline.stages[i];
        let shown: Vec<PathBuf> = match crate::commands::export_record(
            pipeline, &env.store, i, record, &results, is_report,
        ) {
            Ok(exported) => exported.into_iter().map(|e| e.path).collect(),
            Err(e) => {
                env.reporter.line(&format!(
                    "    note  could not refresh {}: {}",
                    results.display(),
                    crate::job::error_chain(&e)
                ));
                record
                    .outputs
                    .iter()
                    .filter(|(name, _)| stage.outputs.get(*name).copied().is_some_and(is_report))
                    .map(|(_, entry)| env.store.artifact_path(entry))
                    .collect()
            }
        };
        for path in shown {
            let page = path.join("index.html");
            let shown = if page.is_file() { page } else { path };
            env.reporter.line(&format!(
                "{:>8}  {} -> {}",
                env.reporter.bold("Report"),
                stage.id,
                shown.display()
            ));
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn make_job(
    run_id: &str,
    pipeline: &Pipeline,
    i: usize,
    inputs: BTreeMap<String, Vec<JobArtifact>>,
    key_parts: serde_json::Value,
    key: String,
    store: &Store,
    mode: JobMode,
) -> Job {
    let stage = &pipeline.stages[i];
    Job {
        run_id: run_id.to_string(),
        stage_id: stage.id.clone(),
        kind: stage.kind.clone(),
        key,
        key_parts,
        params: stage.params.clone(),
        inputs,
        outputs: stage.outputs.clone(),
        resources: stage.resources.clone(),
        device: crate::job::JobDevice::Cpu,
        gpu_ids: Vec::new(),
        threads: stage.resources.cpus.max(1) as usize,
        store: store.root().to_path_buf(),
        mode,
        refresh_memo: false,
    }
}

pub(crate) fn check_gpus(
    planner: &Planner,
    selection: &BTreeSet<usize>,
    visible: usize,
) -> anyhow::Result<()> {
    for &i in selection {
        let stage = planner.stage(i);
        if stage.resources.gpus as usize > visible {
            return Err(anyhow!(
                "stage {} asks for {} GPU(s) but {visible} {} visible to emflow{}; lower `resources.gpus`, or run on a machine with more GPUs",
                stage.id,
                stage.resources.gpus,
                if visible == 1 { "is" } else { "are" },
                std::env::var("CUDA_VISIBLE_DEVICES").map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})")).unwrap_or_default()
            ));
        }
    }
    Ok(())
}
