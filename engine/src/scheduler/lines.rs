//! What a run prints about its stages: the header with the plan's counts, one line per
//! planned stage (also `status` and `plan`), damaged outputs, and the footer.

use serde_json::json;

use super::{RunEnv, RunSummary, StageResult};
use crate::console::{duration, Reporter, Word};
use crate::keys::short;
use crate::pipeline::Pipeline;
use crate::plan::{Planner, StageStatus, State};
use emflow_cache::StageRecord;

/// How many planned stages are cached, to run, and pending (keyed once upstream runs).
pub(crate) struct PlanCounts {
    pub cached: usize,
    pub to_run: usize,
    pub pending: usize,
}

impl PlanCounts {
    pub(crate) fn of(statuses: &[(usize, StageStatus)]) -> Self {
        let count = |f: fn(&State) -> bool| statuses.iter().filter(|(_, s)| f(&s.state)).count();
        let cached = count(|s| matches!(s, State::Cached));
        let pending = count(|s| matches!(s, State::Pending { .. }));
        PlanCounts {
            cached,
            to_run: statuses.len() - cached - pending,
            pending,
        }
    }
}

/// `  profile NAME` for a header line, or nothing without a profile.
pub(crate) fn profile_suffix(pipeline: &Pipeline) -> String {
    pipeline
        .profile
        .as_deref()
        .map(|p| format!("  profile {p}"))
        .unwrap_or_default()
}

pub(super) fn header(
    pipeline: &Pipeline,
    env: &RunEnv,
    run_id: &str,
    statuses: &[(usize, StageStatus)],
    dry_run: bool,
) {
    let PlanCounts {
        cached,
        to_run,
        pending,
    } = PlanCounts::of(statuses);
    let r = &env.reporter;
    let profile = profile_suffix(pipeline);
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
pub(super) fn intact_record(
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

pub(super) fn footer(r: &Reporter, s: &RunSummary) {
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
    if s.interrupted {
        r.line(&interrupted_line(s));
    }
    if r.is_json() {
        r.event("summary", s.to_json());
    }
}

/// What the footer says of a run Ctrl-C (or SIGTERM) stopped: which stages it stopped in,
/// and that the exit status says so too (130, as shells report an interrupted command).
fn interrupted_line(s: &RunSummary) -> String {
    let stopped: Vec<&str> = s
        .stages
        .iter()
        .filter(|(_, r)| *r == StageResult::Interrupted)
        .map(|(id, _)| id.as_str())
        .collect();
    let during = match stopped.as_slice() {
        [] => "between stages".to_string(),
        ids => format!("during {}", ids.join(", ")),
    };
    format!(
        "{:>8}  the run was interrupted {during}; exit status 130. `emflow run` again resumes it",
        "STOPPED"
    )
}
