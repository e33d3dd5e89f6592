//! The read-mostly commands over a planned pipeline: `status`, `plan`, `graph`, `lock`,
//! `check`, `verify`, `gc`, `cache ls|show|path|verify`, `kinds`. Each is a function returning what it found,
//! so tests call them directly and the CLI only maps results to exit codes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::anyhow;
use emflow_cache::{EntryKind, GcOptions, GcReport, OutputEntry, StageRecord, Store};
use serde_json::json;

use crate::executor::{Executor, Wake};
use crate::job::{error_chain, JobArtifact, JobMode, JobOutcome};
use crate::keys::{explain_change, model_fetch_key, short, KeyChange};
use crate::kind::{ArtifactType, Registry};
use crate::lockfile::{self, LockFile, LockedModel, LockedStage, ManifestLock};
use crate::pipeline::Pipeline;
use crate::plan::{model_source, ModelSource, Planner, Resolved, StageStatus, State};
use crate::report::{Reporter, Word};
use crate::run::{check_gpus, make_job, plan_line};
use crate::slots::Slots;

/// `emflow plan`: each planned instance's state (as `run --dry-run` shows it), then the judge
/// calls the plan makes, per stage and in total, priced with `budget`'s prices. `only`
/// restricts the plan to those stages and their upstream. The caller checks the limits.
pub fn plan(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
    reporter: &Reporter,
    only: &[String],
    budget: &crate::judge_cost::JudgeBudget,
) -> anyhow::Result<crate::judge_cost::JudgeCostPlan> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let selection = if only.is_empty() {
        (0..pipeline.stages.len()).collect()
    } else {
        planner.dag.upstream_closure(planner.select(only)?)
    };
    let statuses = planner.statuses(Some(&selection), &BTreeSet::new())?;
    let count = |label: &str| {
        statuses
            .iter()
            .filter(|(_, s)| s.state.label() == label)
            .count()
    };
    let profile = pipeline
        .profile
        .as_deref()
        .map(|p| format!("  profile {p}"))
        .unwrap_or_default();
    reporter.line(&format!(
        "{} {}{profile}",
        reporter.bold("Planning"),
        pipeline.manifest_path.display()
    ));
    reporter.line(&format!(
        "{:>8}  {} stages: {} cached, {} to run, {} pending (keys known once their upstream has run)",
        reporter.bold("Plan"),
        statuses.len(),
        count("cached"),
        statuses.len() - count("cached") - count("pending"),
        count("pending"),
    ));
    reporter.event(
        "plan",
        json!({ "manifest": pipeline.manifest_path, "profile": pipeline.profile, "stages": statuses.len(), "cached": count("cached"), "pending": count("pending") }),
    );
    for (_, s) in &statuses {
        plan_line(reporter, s);
    }
    let costs = crate::judge_cost::JudgeCostPlan::estimate(&mut planner, &statuses, budget)?;
    costs.print(reporter);
    Ok(costs)
}

/// `emflow status`: every instance's state and why.
pub fn status(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
    reporter: &Reporter,
) -> anyhow::Result<Vec<StageStatus>> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let statuses: Vec<StageStatus> = planner
        .statuses(None, &BTreeSet::new())?
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    let count = |label: &str| statuses.iter().filter(|s| s.state.label() == label).count();
    reporter.line(&format!(
        "{} {}: {} stages: {} cached, {} stale, {} missing, {} pending{}",
        reporter.bold("Status"),
        pipeline.manifest_path.display(),
        statuses.len(),
        count("cached"),
        count("stale"),
        count("missing"),
        count("pending"),
        match count("damaged") {
            0 => String::new(),
            n => format!(", {n} damaged"),
        }
    ));
    // Changed stages first (what the user just did), then the rest in pipeline order.
    let rank = |s: &StageStatus| match &s.state {
        State::Damaged { .. } | State::Stale { .. } => 0,
        State::Pending { changes, .. } if !changes.is_empty() => 1,
        State::Missing { .. } => 2,
        State::Pending { .. } => 3,
        State::Cached => 4,
    };
    let mut shown: Vec<&StageStatus> = statuses.iter().collect();
    shown.sort_by_key(|s| rank(s));
    for s in shown {
        plan_line(reporter, s);
    }
    Ok(statuses)
}

/// Output formats of `emflow graph`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Dot,
    Mermaid,
    Json,
}

/// `emflow graph`: the stage DAG coloured by status.
pub fn graph(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
    format: GraphFormat,
) -> anyhow::Result<String> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let statuses: HashMap<usize, StageStatus> = planner
        .statuses(None, &BTreeSet::new())?
        .into_iter()
        .collect();
    let color = |i: usize| match statuses.get(&i).map(|s| s.state.label()) {
        Some("cached") => "#b7e4b0",
        Some("stale") => "#ffd27f",
        Some("missing") => "#9ecbff",
        _ => "#e0e0e0",
    };
    let label = |i: usize| {
        let s = &pipeline.stages[i];
        format!(
            "{}\\n{} · {}",
            s.id,
            s.kind,
            statuses.get(&i).map(|s| s.state.label()).unwrap_or("?")
        )
    };
    let mut out = String::new();
    match format {
        GraphFormat::Dot => {
            let _ = writeln!(out, "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];", pipeline.name);
            for &i in planner.dag.order() {
                let _ = writeln!(
                    out,
                    "  n{i} [label=\"{}\", fillcolor=\"{}\"];",
                    label(i).replace('"', "\\\""),
                    color(i)
                );
            }
            for (a, b) in planner.dag.edges() {
                let _ = writeln!(out, "  n{a} -> n{b};");
            }
            out.push_str("}\n");
        }
        GraphFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for &i in planner.dag.order() {
                let text = label(i).replace("\\n", "<br/>").replace('"', "#quot;");
                let _ = writeln!(out, "  n{i}[\"{text}\"]");
                let _ = writeln!(out, "  style n{i} fill:{}", color(i));
            }
            for (a, b) in planner.dag.edges() {
                let _ = writeln!(out, "  n{a} --> n{b}");
            }
        }
        GraphFormat::Json => {
            let nodes: Vec<_> = planner
                .dag
                .order()
                .iter()
                .map(|&i| {
                    let s = &pipeline.stages[i];
                    let st = statuses.get(&i);
                    json!({ "id": s.id, "stage": s.stage, "kind": s.kind, "status": st.map(|s| s.state.label()), "key": st.and_then(|s| s.key.clone()) })
                })
                .collect();
            let edges: Vec<_> = planner
                .dag
                .edges()
                .map(|(a, b)| json!({ "from": pipeline.stages[a].id, "to": pipeline.stages[b].id }))
                .collect();
            out = serde_json::to_string_pretty(
                &json!({ "name": pipeline.name, "nodes": nodes, "edges": edges }),
            )?;
            out.push('\n');
        }
    }
    Ok(out)
}

/// `emflow lock`: writes the pipeline's keys and output digests into `emflow.lock`.
/// Every stage must be cached (run it first).
pub fn lock(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
) -> anyhow::Result<(PathBuf, ManifestLock)> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let statuses = planner.statuses(None, &BTreeSet::new())?;
    let not_cached: Vec<String> = statuses
        .iter()
        .filter(|(_, s)| !matches!(s.state, State::Cached))
        .map(|(_, s)| format!("{} ({})", s.id, s.state.label()))
        .collect();
    if !not_cached.is_empty() {
        return Err(anyhow!(
            "cannot lock: {} stage(s) are not cached: {}; run `emflow run {}` first",
            not_cached.len(),
            not_cached.join(", "),
            pipeline.manifest_path.display()
        ));
    }
    let mut section = ManifestLock {
        profile: pipeline.profile.clone(),
        ..ManifestLock::default()
    };
    for (_, s) in statuses {
        let record = s.record.ok_or_else(|| {
            anyhow!(
                "stage {} is cached but its record vanished; run again",
                s.id
            )
        })?;
        section.stages.insert(
            s.id.clone(),
            LockedStage {
                kind: s.kind,
                key: record.key.clone(),
                outputs: record
                    .outputs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.digest.clone()))
                    .collect(),
                key_parts: record.key_parts.clone(),
            },
        );
    }
    let used = planner.models_used(0..pipeline.stages.len());
    let models = planner.available_models(&used)?;
    for name in used {
        let decl = &pipeline.models[&name];
        let art = models
            .get(&name)
            .ok_or_else(|| anyhow!("model `{name}` is not fetched yet; run `emflow run` first"))?;
        let fetch_key = matches!(
            model_source(decl, &pipeline.manifest_dir),
            ModelSource::Fetched { .. }
        )
        .then(|| model_fetch_key(&decl.source));
        section.models.insert(
            name,
            LockedModel {
                source: decl.source.clone(),
                digest: art.digest.clone(),
                fetch_key,
            },
        );
    }
    let path = lockfile::lock_path(&pipeline.manifest_path);
    let mut file = lockfile::read(&path)?.unwrap_or(LockFile {
        emflow_lock: lockfile::LOCK_VERSION,
        manifests: BTreeMap::new(),
    });
    file.manifests.insert(
        lockfile::section_name(&pipeline.manifest_path),
        section.clone(),
    );
    lockfile::write(&path, &file)?;
    Ok((path, section))
}

/// One stage whose key no longer matches the lock.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Mismatch {
    pub stage: String,
    pub why: Vec<String>,
}

/// `emflow check`: recomputes every key from the manifest, using the lock's output digests
/// for upstream stages (so no store content is needed), and lists the stages whose key
/// differs from the lock. Empty = the lock still holds.
pub fn check(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
) -> anyhow::Result<Vec<Mismatch>> {
    let path = lockfile::lock_path(&pipeline.manifest_path);
    let section_name = lockfile::section_name(&pipeline.manifest_path);
    let file = lockfile::read(&path)?.ok_or_else(|| {
        anyhow!(
            "no {} next to the manifest; run `emflow run` and `emflow lock` first",
            lockfile::LOCK_FILE
        )
    })?;
    let locked = file.manifests.get(&section_name).ok_or_else(|| {
        anyhow!(
            "{} has no entry for {section_name}; run `emflow lock {}`",
            path.display(),
            pipeline.manifest_path.display()
        )
    })?;
    let mut planner = Planner::new(pipeline, registry, store)?;
    let mut mismatches = Vec::new();
    if locked.profile != pipeline.profile {
        mismatches.push(Mismatch {
            stage: "(profile)".into(),
            why: vec![format!(
                "locked with profile {:?}, checked with {:?}",
                locked.profile, pipeline.profile
            )],
        });
    }

    // Models: local ones are hashed now; fetched ones are taken from the lock.
    let used = planner.models_used(0..pipeline.stages.len());
    let mut models = HashMap::new();
    for name in &used {
        let decl = &pipeline.models[name];
        let digest = match model_source(decl, &pipeline.manifest_dir) {
            ModelSource::Local(p) if p.exists() => planner.file_digest(&p)?,
            ModelSource::Local(p) => {
                return Err(anyhow!("model `{name}`: {} does not exist", p.display()))
            }
            ModelSource::Fetched { .. } => match locked.models.get(name) {
                Some(m) if m.source == decl.source => m.digest.clone(),
                Some(m) => {
                    mismatches.push(Mismatch {
                        stage: format!("models.{name}"),
                        why: vec![format!("source: {} -> {}", m.source, decl.source)],
                    });
                    continue;
                }
                None => {
                    mismatches.push(Mismatch {
                        stage: format!("models.{name}"),
                        why: vec!["not in the lock".into()],
                    });
                    continue;
                }
            },
        };
        models.insert(
            name.clone(),
            JobArtifact {
                path: PathBuf::new(),
                digest,
                ty: ArtifactType::Model,
                origin: format!("models.{name}"),
            },
        );
    }

    let mut records: Vec<Option<StageRecord>> = vec![None; pipeline.stages.len()];
    let order = planner.dag.order().to_vec();
    for i in order {
        let id = pipeline.stages[i].id.clone();
        let Some(entry) = locked.stages.get(&id) else {
            mismatches.push(Mismatch {
                stage: id,
                why: vec!["new stage, not in the lock".into()],
            });
            continue;
        };
        match planner.resolve(i, &records, &models)? {
            Resolved::Pending { waiting_on } => {
                mismatches.push(Mismatch {
                    stage: id,
                    why: vec![format!(
                        "cannot be checked: upstream {} changed",
                        waiting_on.join(", ")
                    )],
                });
            }
            Resolved::Ready { parts, key, .. } => {
                if key != entry.key {
                    let why: Vec<String> = explain_change(&entry.key_parts, &parts)
                        .into_iter()
                        .map(|c: KeyChange| c.detail)
                        .collect();
                    mismatches.push(Mismatch { stage: id, why });
                } else {
                    let outputs = entry
                        .outputs
                        .iter()
                        .map(|(k, d)| {
                            (
                                k.clone(),
                                OutputEntry {
                                    digest: d.clone(),
                                    kind: EntryKind::File,
                                    size: 0,
                                },
                            )
                        })
                        .collect();
                    records[i] = Some(StageRecord {
                        key,
                        outputs,
                        ..StageRecord::default()
                    });
                }
            }
        }
    }
    let present: BTreeSet<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
    for id in locked.stages.keys() {
        if !present.contains(id.as_str()) {
            mismatches.push(Mismatch {
                stage: id.clone(),
                why: vec!["in the lock but no longer in the manifest".into()],
            });
        }
    }
    Ok(mismatches)
}

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
    let detail = crate::run::damage_lines(outputs);
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
    for (i, s) in &statuses {
        if !selected.contains(i) {
            continue;
        }
        if let State::Damaged { outputs } = &s.state {
            results.push(damaged_verdict(reporter, &s.id, outputs));
            continue;
        }
        if records[*i].is_none() {
            reporter.status(
                Word::Skip,
                &s.id,
                "not cached: nothing to compare with; run `emflow run` first",
                "",
            );
            results.push(Verification {
                stage: s.id.clone(),
                verdict: "not_cached",
                differing: BTreeMap::new(),
                error: None,
            });
            continue;
        }
        if let Resolved::Ready { inputs, parts, key } = planner.resolve(*i, &records, &models)? {
            todo.push((
                *i,
                make_job(
                    &run_id,
                    pipeline,
                    *i,
                    inputs,
                    parts.to_value(),
                    key,
                    store,
                    JobMode::Verify,
                ),
            ));
        }
    }
    let mut slots = Slots::new(jobs, crate::host::cores(), gpus);
    let (tx, rx) = mpsc::channel();
    let wake = Wake(tx);
    let mut running = Vec::new();
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
            let recorded = records[i]
                .as_ref()
                .map(|r| r.outputs.clone())
                .unwrap_or_default();
            let v = match finished.outcome {
                JobOutcome::Verified {
                    outputs,
                    duration_s,
                } => {
                    let differing: BTreeMap<String, (String, String)> = outputs
                        .iter()
                        .filter_map(|(name, d)| {
                            let old = recorded
                                .get(name)
                                .map(|e| e.digest.clone())
                                .unwrap_or_default();
                            (old != *d).then(|| (name.clone(), (old, d.clone())))
                        })
                        .collect();
                    if differing.is_empty() {
                        reporter.status(
                            Word::Verify,
                            &id,
                            &format!(
                                "{}  reproduces its recorded outputs",
                                crate::report::duration(duration_s)
                            ),
                            "",
                        );
                        Verification {
                            stage: id,
                            verdict: "same",
                            differing,
                            error: None,
                        }
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
                        Verification {
                            stage: id,
                            verdict: "differs",
                            differing,
                            error: None,
                        }
                    }
                }
                JobOutcome::Failed { error } => {
                    reporter.status(Word::Fail, &id, "re-execution failed", &error);
                    Verification {
                        stage: id,
                        verdict: "failed",
                        differing: BTreeMap::new(),
                        error: Some(error),
                    }
                }
                other => {
                    let error = format!("unexpected outcome {other:?}");
                    reporter.status(Word::Fail, &id, &error, "");
                    Verification {
                        stage: id,
                        verdict: "failed",
                        differing: BTreeMap::new(),
                        error: Some(error),
                    }
                }
            };
            reporter.event("verify", json!(v));
            results.push(v);
        }
    }
    Ok(results)
}

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

/// Where the store is: `--store`, else `EMFLOW_HOME`, else `.emflow/` next to the manifest.
pub fn store_location(flag: Option<&Path>, manifest: Option<&Path>) -> PathBuf {
    let chosen = if let Some(p) = flag {
        p.to_path_buf()
    } else if let Some(home) = std::env::var_os("EMFLOW_HOME").filter(|v| !v.is_empty()) {
        PathBuf::from(home)
    } else {
        match manifest.and_then(|m| m.parent()) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(".emflow"),
            _ => PathBuf::from(".emflow"),
        }
    };
    // Absolute, because stages run in other working directories and read artifacts
    // by the paths derived from it.
    std::path::absolute(&chosen).unwrap_or(chosen)
}

/// Formats a failed command's error for the terminal.
pub fn describe_error(err: &anyhow::Error) -> String {
    error_chain(err)
}
