//! `emflow status` and `emflow plan`: each planned stage's state and why; `plan` adds the
//! judge calls the plan makes.

use std::collections::BTreeSet;

use emflow_cache::Store;
use serde_json::json;

use crate::console::Reporter;
use crate::kind::Registry;
use crate::pipeline::Pipeline;
use crate::plan::{Planner, StageStatus, State};
use crate::scheduler::{plan_line, profile_suffix, PlanCounts};

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
) -> anyhow::Result<(crate::judge_cost::JudgeCostPlan, crate::memory::MemoryPlan)> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let selection = if only.is_empty() {
        (0..pipeline.stages.len()).collect()
    } else {
        planner.dag.upstream_closure(planner.select(only)?)
    };
    let statuses = planner.statuses(Some(&selection), &BTreeSet::new())?;
    let PlanCounts {
        cached,
        to_run,
        pending,
    } = PlanCounts::of(&statuses);
    reporter.line(&format!(
        "{} {}{}",
        reporter.bold("Planning"),
        pipeline.manifest_path.display(),
        profile_suffix(pipeline)
    ));
    reporter.line(&format!(
        "{:>8}  {} stages: {cached} cached, {to_run} to run, {pending} pending (keys known once their upstream has run)",
        reporter.bold("Plan"),
        statuses.len(),
    ));
    reporter.event(
        "plan",
        json!({ "manifest": pipeline.manifest_path, "profile": pipeline.profile, "stages": statuses.len(), "cached": cached, "pending": pending }),
    );
    for (_, s) in &statuses {
        plan_line(reporter, s);
    }
    let memory = crate::memory::MemoryPlan::of(&planner, &selection, crate::host::gpu_memory);
    let costs = crate::judge_cost::JudgeCostPlan::estimate(&mut planner, &statuses, budget)?;
    costs.print(reporter);
    memory.print(reporter);
    Ok((costs, memory))
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
