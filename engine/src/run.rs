//! `emflow run`: plan, fetch models, then schedule stages as their inputs appear.
//!
//! Keys are resolved lazily: a stage is looked up in the store only once every upstream
//! has a record, because its key contains their output digests. A cache hit settles the
//! stage at once and may unblock more; a miss becomes a [`Job`] that waits for free slots
//! (`--jobs`, CPUs, GPU ids) and goes to the [`Executor`]. A failure stops new work (the
//! running stages finish and commit) unless `--keep-going`; Ctrl-C cancels running stages
//! (they may checkpoint) and stops. Every run writes a run record to the store, which `gc`
//! uses to keep what recent runs used.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use emflow_cache::{StageRecord, Store};
use serde::Serialize;
use serde_json::json;

use crate::executor::{Executor, JobHandle, Wake};
use crate::job::{error_chain, Job, JobArtifact, JobMode, JobOutcome};
use crate::keys::{model_fetch_key, short};
use crate::kind::Registry;
use crate::pipeline::Pipeline;
use crate::plan::{
    model_source, model_stage_id, ModelSource, Planner, Resolved, StageStatus, State,
};
use crate::report::{duration, Reporter, StageProgress, Word};
use crate::slots::{Allocation, Slots};

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Waiting,
    Queued,
    Running,
    Settled,
}

struct Running {
    i: usize,
    handle: Box<dyn JobHandle>,
    alloc: Allocation,
    progress: Arc<StageProgress>,
    started: Instant,
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

pub fn run_pipeline(
    pipeline: &Pipeline,
    env: &RunEnv,
    opts: &RunOptions,
) -> anyhow::Result<RunSummary> {
    let clock = Instant::now();
    let run_id = crate::host::new_run_id();
    let started_at = crate::host::now_rfc3339();
    let store = env.store.as_ref();
    let mut planner = Planner::new(pipeline, env.registry, store)?;
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
    // run refuses after the judge budget check below, which holds on any machine.
    let gpu_shortfall = check_gpus(&planner, &selection, opts.gpus.len());

    let statuses = planner.statuses(Some(&selection), &forced)?;
    header(pipeline, env, &run_id, &statuses, opts.dry_run);
    if opts.dry_run {
        for (_, s) in &statuses {
            plan_line(&env.reporter, s);
        }
        crate::judge_cost::dry_run_report(&mut planner, &statuses, &opts.judge, &env.reporter)?;
        if let Err(e) = gpu_shortfall {
            env.reporter.line(&format!(
                "\nnote: a real run on this machine would stop first: {e}"
            ));
        }
        let stages = statuses
            .iter()
            .map(|(_, s)| {
                (
                    s.id.clone(),
                    if matches!(s.state, State::Cached) {
                        StageResult::Cached
                    } else {
                        StageResult::WouldRun
                    },
                )
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
        return Ok(summary);
    }

    crate::judge_cost::guard(&mut planner, &statuses, &opts.judge, &env.reporter)?;
    gpu_shortfall?;
    let mut model_keys = fetch_models(&mut planner, &selection, env)?;
    let models = planner.available_models(&planner.models_used(selection.iter().copied()))?;

    let n = pipeline.stages.len();
    let order: Vec<usize> = planner
        .dag
        .order()
        .iter()
        .copied()
        .filter(|i| selection.contains(i))
        .collect();
    let mut slot = vec![Slot::Settled; n];
    for &i in &order {
        slot[i] = Slot::Waiting;
    }
    let mut records: Vec<Option<StageRecord>> = vec![None; n];
    // Records the plan already read and found intact, by key: a no-op rerun reads and
    // checks each record once, not once for the header and again to settle the stage.
    let mut planned: HashMap<String, StageRecord> = statuses
        .into_iter()
        .filter(|(_, s)| matches!(s.state, State::Cached))
        .filter_map(|(_, s)| Some((s.key?, s.record?)))
        .collect();
    let mut results: HashMap<usize, StageResult> = HashMap::new();
    let mut errors = BTreeMap::new();
    let mut queue: Vec<(usize, Job)> = Vec::new();
    let mut running: Vec<Running> = Vec::new();
    let mut slots = Slots::new(opts.jobs, opts.cpus, opts.gpus.clone());
    let (tx, rx) = mpsc::channel();
    let wake = Wake(tx);
    let mut stopping = false;
    let mut cancel_deadline: Option<Instant> = None;

    loop {
        // Settle what can be settled without running anything, in topological order, so a
        // chain of cache hits resolves in one pass.
        for &i in &order {
            if slot[i] != Slot::Waiting {
                continue;
            }
            let ups: Vec<usize> = planner.dag.upstream(i).collect();
            if let Some(&bad) = ups.iter().find(|j| {
                matches!(
                    results.get(j),
                    Some(StageResult::Failed | StageResult::Skipped | StageResult::Interrupted)
                )
            }) {
                let reason = format!("upstream {} did not complete", pipeline.stages[bad].id);
                env.reporter
                    .status(Word::Skip, &pipeline.stages[i].id, &reason, "");
                env.reporter.event(
                    "skip",
                    json!({ "stage": pipeline.stages[i].id, "reason": reason }),
                );
                slot[i] = Slot::Settled;
                results.insert(i, StageResult::Skipped);
                continue;
            }
            if ups.iter().any(|&j| records[j].is_none()) {
                continue;
            }
            match planner.resolve(i, &records, &models)? {
                Resolved::Pending { waiting_on } => {
                    return Err(anyhow!(
                        "stage {} still waits on {} after its upstream completed; this is a bug",
                        pipeline.stages[i].id,
                        waiting_on.join(", ")
                    ))
                }
                Resolved::Ready { inputs, parts, key } => {
                    let cached = if forced.contains(&i) {
                        None
                    } else if let Some(record) = planned.remove(&key) {
                        Some(record)
                    } else {
                        intact_record(&mut planner, &env.reporter, &pipeline.stages[i].id, &key)?
                    };
                    match cached {
                        Some(record) => {
                            store.note_stage_record(&pipeline.stages[i].id, &key)?;
                            env.reporter.status(
                                Word::Cached,
                                &pipeline.stages[i].id,
                                &format!("({})", short(&key)),
                                "",
                            );
                            env.reporter.event(
                                "cached",
                                json!({ "stage": pipeline.stages[i].id, "key": key }),
                            );
                            records[i] = Some(record);
                            results.insert(i, StageResult::Cached);
                            slot[i] = Slot::Settled;
                        }
                        None => {
                            let job = make_job(
                                &run_id,
                                pipeline,
                                i,
                                inputs,
                                parts.to_value(),
                                key,
                                store,
                                JobMode::Commit {
                                    force: forced.contains(&i),
                                },
                            );
                            queue.push((i, job));
                            slot[i] = Slot::Queued;
                        }
                    }
                }
            }
        }

        // Start what fits, in topological order (the queue keeps insertion order).
        if !stopping {
            let mut k = 0;
            while k < queue.len() {
                let i = queue[k].0;
                let Some(alloc) = slots.try_take(&pipeline.stages[i].resources) else {
                    k += 1;
                    continue;
                };
                let (i, mut job) = queue.remove(k);
                job.threads = alloc.cpus;
                job.refresh_memo = opts.refresh_memo;
                job.device = alloc.device();
                job.gpu_ids = alloc.gpu_ids();
                let progress = env.reporter.stage_progress(&pipeline.stages[i].id);
                match env.executor.submit(job, progress.clone(), wake.clone()) {
                    Ok(handle) => {
                        slot[i] = Slot::Running;
                        running.push(Running {
                            i,
                            handle,
                            alloc,
                            progress,
                            started: Instant::now(),
                        });
                    }
                    Err(err) => {
                        slots.give_back(alloc);
                        progress.finish();
                        fail(
                            env,
                            &pipeline.stages[i].id,
                            0.0,
                            &error_chain(&err),
                            &mut errors,
                        );
                        results.insert(i, StageResult::Failed);
                        slot[i] = Slot::Settled;
                        stopping |= !opts.keep_going;
                    }
                }
            }
        }

        // With nothing running and nothing queued, every waiting stage has been settled:
        // the pass above resolves a waiting stage as soon as its upstream is settled.
        if running.is_empty() && (stopping || queue.is_empty()) {
            break;
        }

        let _ = rx.recv_timeout(Duration::from_millis(100));
        while rx.try_recv().is_ok() {}

        if env.stop.load(Ordering::Relaxed) && cancel_deadline.is_none() {
            stopping = true;
            cancel_deadline = Some(Instant::now() + Duration::from_secs(10));
            env.reporter.line("stopping: asking running stages to save a checkpoint and stop (Ctrl-C again to kill them now)");
            for r in &mut running {
                r.handle.cancel();
            }
        }
        if let Some(deadline) = cancel_deadline {
            if Instant::now() > deadline
                || env.stop.load(Ordering::Relaxed) && crate::signals::second_interrupt()
            {
                for r in &mut running {
                    r.handle.kill();
                }
            }
        }

        let mut k = 0;
        while k < running.len() {
            let finished = match running[k].handle.poll() {
                Ok(f) => f,
                Err(err) => {
                    env.reporter
                        .line(&format!("warning: {}", error_chain(&err)));
                    None
                }
            };
            let Some(finished) = finished else {
                k += 1;
                continue;
            };
            let r = running.remove(k);
            slots.give_back(r.alloc);
            r.progress.finish();
            let id = &pipeline.stages[r.i].id;
            let secs = r.started.elapsed().as_secs_f64();
            slot[r.i] = Slot::Settled;
            match finished.outcome {
                JobOutcome::Committed { record, reused } => {
                    if reused {
                        // Same id: another process ran this very stage. Another id: a stage
                        // whose inputs turned out identical to this one's (its upstream
                        // produced the same bytes) committed the key first.
                        let origin = if record.stage_id == *id {
                            "produced meanwhile by another emflow process".to_string()
                        } else {
                            format!(
                                "the same key as {}, which produced it first",
                                record.stage_id
                            )
                        };
                        env.reporter.status(
                            Word::Cached,
                            id,
                            &format!("({}, {origin})", short(&record.key)),
                            "",
                        );
                        env.reporter.event(
                            "cached",
                            json!({ "stage": id, "key": record.key, "reused": true }),
                        );
                        results.insert(r.i, StageResult::Reused);
                    } else {
                        let rss = finished.peak_rss_bytes.unwrap_or(record.peak_rss_bytes);
                        let mem = if rss > 0 {
                            format!("  peak {}", crate::host::human_bytes(rss))
                        } else {
                            String::new()
                        };
                        env.reporter.status(
                            Word::Pass,
                            id,
                            &format!("{}{mem}", duration(secs)),
                            "",
                        );
                        env.reporter.event("pass", json!({ "stage": id, "key": record.key, "duration_s": secs, "peak_rss_bytes": rss }));
                        results.insert(r.i, StageResult::Ran);
                    }
                    records[r.i] = Some(*record);
                }
                JobOutcome::Failed { error } => {
                    fail(env, id, secs, &error, &mut errors);
                    results.insert(r.i, StageResult::Failed);
                    stopping |= !opts.keep_going;
                }
                JobOutcome::Interrupted => {
                    env.reporter.status(
                        Word::Stop,
                        id,
                        &format!(
                            "{}  stopped on request; the next `emflow run` runs it again (from its checkpoint, if it saved one)",
                            duration(secs)
                        ),
                        "",
                    );
                    env.reporter
                        .event("interrupted", json!({ "stage": id, "duration_s": secs }));
                    results.insert(r.i, StageResult::Interrupted);
                    stopping = true;
                }
                JobOutcome::Verified { .. } => {
                    return Err(anyhow!("executor returned a verify result for a run job"))
                }
            }
        }
    }

    let interrupted = env.stop.load(Ordering::Relaxed);
    for &i in &order {
        if slot[i] != Slot::Settled {
            let why = if interrupted {
                "the run was stopped"
            } else {
                "the run stopped after a failure (--keep-going runs independent stages)"
            };
            env.reporter.status(
                Word::Skip,
                &pipeline.stages[i].id,
                &format!("not started: {why}"),
                "",
            );
            env.reporter.event(
                "skip",
                json!({ "stage": pipeline.stages[i].id, "reason": why }),
            );
            results.insert(i, StageResult::Skipped);
        }
    }
    let stages: Vec<(String, StageResult)> = order
        .iter()
        .map(|&i| {
            (
                pipeline.stages[i].id.clone(),
                results.get(&i).cloned().unwrap_or(StageResult::Skipped),
            )
        })
        .collect();
    let summary = RunSummary {
        run_id: run_id.clone(),
        stages,
        errors,
        elapsed_s: clock.elapsed().as_secs_f64(),
        interrupted,
    };

    let mut keys: Vec<String> = order
        .iter()
        .filter_map(|&i| records[i].as_ref().map(|r| r.key.clone()))
        .collect();
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
            "key": records[i].as_ref().map(|r| r.key.clone()),
            "result": results.get(&i),
        }))).collect::<serde_json::Map<_, _>>(),
        "keys": keys,
    });
    store
        .write_run(&run_id, &run_record)
        .context("writing the run record")?;
    footer(&env.reporter, &summary);
    // Point at what a person opens next: every report this run produced or reused.
    for &i in &order {
        let (Some(record), "report") = (records[i].as_ref(), pipeline.stages[i].kind.as_str())
        else {
            continue;
        };
        for entry in record.outputs.values() {
            let path = store.artifact_path(entry);
            let page = path.join("index.html");
            let shown = if page.is_file() { page } else { path };
            env.reporter.line(&format!(
                "{:>8}  {} -> {}",
                env.reporter.bold("Report"),
                pipeline.stages[i].id,
                shown.display()
            ));
        }
    }
    Ok(summary)
}

fn fail(env: &RunEnv, id: &str, secs: f64, error: &str, errors: &mut BTreeMap<String, String>) {
    env.reporter.status(Word::Fail, id, &duration(secs), error);
    env.reporter.event(
        "fail",
        json!({ "stage": id, "duration_s": secs, "error": error }),
    );
    errors.insert(id.to_string(), error.to_string());
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

/// Fetches every `pip:`/`hf:` model the selection reads that is not in the store yet.
/// Returns the fetch keys the selection uses (for the run record).
fn fetch_models(
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

fn header(
    pipeline: &Pipeline,
    env: &RunEnv,
    run_id: &str,
    statuses: &[(usize, StageStatus)],
    dry_run: bool,
) {
    let cached = statuses
        .iter()
        .filter(|(_, s)| matches!(s.state, State::Cached))
        .count();
    let pending = statuses
        .iter()
        .filter(|(_, s)| matches!(s.state, State::Pending { .. }))
        .count();
    let to_run = statuses.len() - cached - pending;
    let r = &env.reporter;
    let profile = pipeline
        .profile
        .as_deref()
        .map(|p| format!("  profile {p}"))
        .unwrap_or_default();
    r.line(&format!(
        "{} {}{profile}  ({} executor{})",
        r.bold(if dry_run { "Planning" } else { "Running" }),
        pipeline.manifest_path.display(),
        env.executor.name(),
        if dry_run { ", dry run" } else { "" }
    ));
    let pending_text = if pending > 0 {
        format!(", {pending} pending (keys known once their upstream has run)")
    } else {
        String::new()
    };
    r.line(&format!(
        "{:>8}  {} stages: {cached} cached, {to_run} to run{pending_text}",
        r.bold("Plan"),
        statuses.len()
    ));
    r.event(
        "plan",
        json!({ "run_id": run_id, "manifest": pipeline.manifest_path, "profile": pipeline.profile, "stages": statuses.len(), "cached": cached, "to_run": to_run, "pending": pending, "dry_run": dry_run }),
    );
}

/// One line (plus reasons) for a planned stage; used by `run --dry-run` and `status`.
pub fn plan_line(r: &Reporter, s: &StageStatus) {
    let key = s
        .key
        .as_deref()
        .map(|k| format!("({})", short(k)))
        .unwrap_or_default();
    let (word, detail) = match &s.state {
        State::Cached => (Word::Cached, String::new()),
        State::Damaged { outputs } => (
            Word::Damaged,
            format!(
                "{}\nruns again; its commit replaces the damaged blobs",
                damage_lines(outputs)
            ),
        ),
        State::Stale { changes } => (
            Word::Stale,
            changes
                .iter()
                .map(|c| c.detail.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        State::Missing { note } => (
            Word::Missing,
            note.clone().unwrap_or_else(|| "never run".into()),
        ),
        State::Pending {
            waiting_on,
            changes,
        } => {
            let mut lines: Vec<String> = changes.iter().map(|c| c.detail.clone()).collect();
            lines.push(format!(
                "key known once {} {} run",
                waiting_on.join(", "),
                if waiting_on.len() == 1 { "has" } else { "have" }
            ));
            (Word::Pending, lines.join("\n"))
        }
    };
    r.status(word, &s.id, &key, &detail);
    // Built only when someone reads it: at 100,000 stages these values cost real memory.
    if r.is_json() {
        r.event("stage", json!(s));
    }
}

/// One line per damaged output: which output, where its blob is, what is wrong, what happens.
pub fn damage_lines(outputs: &[emflow_cache::DamagedOutput]) -> String {
    outputs
        .iter()
        .map(|d| format!("output `{}` ({}): {}", d.output, d.path.display(), d.damage))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The record of `key` when every output it names is intact. A damaged record is reported
/// (status line and `damaged` event naming the stage and each output) and treated as absent,
/// so the stage runs again and its commit replaces the bad blobs.
fn intact_record(
    planner: &mut Planner,
    reporter: &Reporter,
    stage_id: &str,
    key: &str,
) -> anyhow::Result<Option<StageRecord>> {
    let Some(record) = planner.store.record(key)? else {
        return Ok(None);
    };
    let damaged = planner.damaged_outputs(&record)?;
    if damaged.is_empty() {
        return Ok(Some(record));
    }
    reporter.status(
        Word::Damaged,
        stage_id,
        &format!("({})", short(key)),
        &format!("{}\nrunning it again", damage_lines(&damaged)),
    );
    reporter.event(
        "damaged",
        json!({ "stage": stage_id, "key": key, "outputs": damaged }),
    );
    Ok(None)
}

fn footer(r: &Reporter, s: &RunSummary) {
    let ran = s.count(StageResult::Ran);
    let cached = s.count(StageResult::Cached) + s.count(StageResult::Reused);
    let failed = s.count(StageResult::Failed);
    let skipped = s.count(StageResult::Skipped) + s.count(StageResult::Interrupted);
    r.line("------------");
    if ran == 0 && failed == 0 && skipped == 0 {
        r.line(&format!(
            "{:>8}  nothing to do: all {cached} stages cached ({})",
            r.bold("Summary"),
            duration(s.elapsed_s)
        ));
    } else {
        r.line(&format!(
            "{:>8}  {ran} ran, {cached} cached, {failed} failed, {skipped} not completed in {}",
            r.bold("Summary"),
            duration(s.elapsed_s)
        ));
    }
    for (id, err) in &s.errors {
        let first = err.lines().next().unwrap_or("");
        r.line(&format!("{:>8}  {id}: {first}", "FAILED"));
    }
    if r.is_json() {
        r.event("summary", s.to_json());
    }
}
