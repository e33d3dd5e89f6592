//! Judge cost before a run: how many judge calls each stage will make, how many of them are
//! already answered, how many tokens they send and receive, and what that costs at the
//! user's prices; and the `--max-judge-calls` / `--max-judge-cost` guard that refuses to
//! start a run over budget.
//!
//! The engine only sums and prices. Each kind counts its own calls from its params and the
//! inputs known at plan time ([`StageKind::judge_estimate`]). An input is known when it is
//! a `file:` input, a cached upstream output, or a *preview*: an upstream whose kind can
//! write its outputs cheaply at plan time ([`StageKind::preview`], the `dataset` kind) is
//! previewed into a private staging folder of the store, so that e.g. an `eval` stage can
//! count the questions of a `dataset` stage that has not run yet. Nothing previewed is
//! stored. An input that waits on an upstream stage carries that stage's params
//! ([`PlanInput::upstream_params`]), so a reader can bound what it will get (an `eval` over
//! `snapshots` counts the snapshots its training stage's `snapshot_fractions` ask for).
//!
//! What is and is not known, said as such in the table:
//! - A cached stage makes no call: all its calls are memoised (cost 0 to rerun).
//! - For any other stage the memo may still answer some calls (a rerun after `gc`, or of a
//!   stage whose sampled answers come out the same), but which ones is known only once the
//!   answers are sampled: "unknown until sampled". Costs count every call, so they are an
//!   upper bound in that respect.
//! - Token counts are estimates (characters / 4, answers at their token limit); RL grader
//!   calls are an upper bound (short answers get 0 without a call; early stopping can end
//!   the run sooner). Bounds are marked `<=`.
//!
//! Prices are USD per million prompt / completion tokens, per judge model, from
//! `--judge-price MODEL=IN/OUT` and the `EMFLOW_JUDGE_PRICES` environment variable (same
//! syntax, comma-separated; flags win). emflow ships no prices: an API judge without one is
//! shown as "price not set". A local judge costs no API bill unless a price is set for it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use emflow_cache::{StageRecord, Staging};
use serde::Serialize;
use serde_json::json;

use crate::console::Reporter;
use crate::context::Artifact;
use crate::keys::model_fetch_key;
use crate::kind::{ArtifactType, JudgeEstimate, PlanInput, PlanInputs};
use crate::pipeline::InputRef;
use crate::plan::{model_source, ModelSource, Planner, StageStatus, State};

/// Environment variable with judge prices: `MODEL=IN/OUT[,MODEL=IN/OUT...]`.
pub const PRICES_ENV: &str = "EMFLOW_JUDGE_PRICES";

/// A judge model's price, USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Price {
    pub prompt_per_m: f64,
    pub completion_per_m: f64,
}

/// Prices and limits of one command.
#[derive(Clone, Debug, Default)]
pub struct JudgeBudget {
    /// Judge model name -> price.
    pub prices: BTreeMap<String, Price>,
    /// Refuse a run that would make more judge calls than this.
    pub max_calls: Option<u64>,
    /// Refuse a run whose judge calls would cost more than this many USD.
    pub max_cost: Option<f64>,
}

impl JudgeBudget {
    /// Prices from `EMFLOW_JUDGE_PRICES`, then from `flags` (`MODEL=IN/OUT` each; a flag
    /// replaces the environment's price of the same model), and the limits.
    pub fn from_args(
        flags: &[String],
        max_calls: Option<u64>,
        max_cost: Option<f64>,
    ) -> anyhow::Result<Self> {
        let mut prices = BTreeMap::new();
        if let Ok(env) = std::env::var(PRICES_ENV) {
            for item in env.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (model, price) =
                    parse_price(item).with_context(|| format!("in ${PRICES_ENV}"))?;
                prices.insert(model, price);
            }
        }
        for flag in flags {
            let (model, price) = parse_price(flag).context("in --judge-price")?;
            prices.insert(model, price);
        }
        if let Some(c) = max_cost {
            if !(c.is_finite() && c >= 0.0) {
                bail!("--max-judge-cost must be a non-negative number of USD, got {c}");
            }
        }
        Ok(JudgeBudget {
            prices,
            max_calls,
            max_cost,
        })
    }

    /// Whether a limit is set (a run then estimates before it starts).
    pub fn has_limits(&self) -> bool {
        self.max_calls.is_some() || self.max_cost.is_some()
    }
}

/// Parses `MODEL=IN/OUT` (USD per million prompt / completion tokens). The model name may
/// itself contain `=`; the price is after the last one.
pub fn parse_price(text: &str) -> anyhow::Result<(String, Price)> {
    let usage = || {
        anyhow!(
            "`{text}` is not MODEL=IN/OUT (USD per million prompt and completion tokens), e.g. gpt-4.1-mini=0.40/1.60"
        )
    };
    let (model, price) = text.rsplit_once('=').ok_or_else(usage)?;
    let (input, output) = price.split_once('/').ok_or_else(usage)?;
    let number = |s: &str| -> anyhow::Result<f64> {
        let v: f64 = s.trim().parse().map_err(|_| usage())?;
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(usage())
        }
    };
    let model = model.trim();
    if model.is_empty() {
        return Err(usage());
    }
    Ok((
        model.to_string(),
        Price {
            prompt_per_m: number(input)?,
            completion_per_m: number(output)?,
        },
    ))
}

/// One stage's line of the table.
#[derive(Clone, Debug, Serialize)]
pub struct StageJudgeCost {
    pub stage: String,
    pub kind: String,
    #[serde(flatten)]
    pub estimate: JudgeEstimate,
    /// The stage is cached: every call is memoised and none is made.
    pub cached: bool,
    /// Calls a run would make now: 0 when cached, `None` when not known yet.
    pub to_call: Option<u64>,
    /// The price used, if one is set for the judge model.
    pub price: Option<Price>,
    /// USD for the calls to make; `None` when the calls or the price are not known.
    pub cost_usd: Option<f64>,
}

impl StageJudgeCost {
    fn memoised_text(&self) -> String {
        if self.cached {
            "all (stage cached)".into()
        } else {
            "unknown until sampled".into()
        }
    }

    fn cost_text(&self) -> String {
        match (self.cost_usd, &self.price) {
            (Some(c), Some(_)) => usd(c),
            (Some(_), None) if self.estimate.local && !self.cached => "local, not billed".into(),
            (Some(c), None) => usd(c),
            (None, _) if self.to_call.is_none() => "unknown".into(),
            (None, _) => "price not set".into(),
        }
    }
}

/// Totals over the stages of a plan.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JudgeTotals {
    /// Calls a run would make (stages not cached, counted ones).
    pub to_call: u64,
    /// Calls of cached stages: answered without a call.
    pub memoised: u64,
    /// Whether `to_call` is an upper bound.
    pub upper_bound: bool,
    /// Tokens of the calls to make.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// USD of the priced calls to make (local unpriced judges count 0).
    pub cost_usd: f64,
    /// Stages (not cached) whose calls cannot be counted yet.
    pub unknown_stages: Vec<String>,
    /// API judge models with calls to make and no price.
    pub unpriced_models: Vec<String>,
}

/// The judge calls of a planned run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JudgeCostPlan {
    /// Stages that call a judge, in plan order.
    pub stages: Vec<StageJudgeCost>,
    /// Planned stages that call no judge.
    pub other_stages: usize,
    pub totals: JudgeTotals,
    /// Upstream stages whose plan-time preview failed (stage, error): their readers'
    /// estimates are unknown.
    pub preview_failures: Vec<(String, String)>,
}

impl JudgeCostPlan {
    /// Estimates every stage of `statuses` (the planner's states, in topological order).
    pub fn estimate(
        planner: &mut Planner,
        statuses: &[(usize, StageStatus)],
        budget: &JudgeBudget,
    ) -> anyhow::Result<Self> {
        let mut cached: HashMap<usize, &StageRecord> = HashMap::new();
        for (i, s) in statuses {
            if let (State::Cached, Some(record)) = (&s.state, &s.record) {
                cached.insert(*i, record);
            }
        }
        let mut previews = Previews::default();
        let mut plan = JudgeCostPlan::default();
        for (i, _) in statuses {
            let i = *i;
            let stage = planner.stage(i).clone();
            let kind = planner.registry.kind(&stage.kind).cloned().ok_or_else(|| {
                anyhow!(
                    "stage {} uses kind `{}`, which this emflow binary does not have",
                    stage.id,
                    stage.kind
                )
            })?;
            let inputs = plan_inputs(planner, i, &cached, &previews)?;
            let is_cached = cached.contains_key(&i);
            if !is_cached
                && inputs
                    .ports
                    .values()
                    .flatten()
                    .all(|p| p.artifact.is_some())
            {
                let dir = previews.dir_for(planner, i)?;
                match kind.preview(&stage.params, &inputs, &dir) {
                    Ok(true) => {
                        previews.done.insert(i, dir);
                    }
                    Ok(false) => {}
                    Err(e) => plan
                        .preview_failures
                        .push((stage.id.clone(), format!("{e:#}"))),
                }
            }
            let estimate = match kind.judge_estimate(&stage.params, &inputs) {
                Ok(None) => {
                    plan.other_stages += 1;
                    continue;
                }
                Ok(Some(e)) => e,
                Err(e) => JudgeEstimate::unknown(
                    "unknown".into(),
                    false,
                    format!("could not estimate: {e:#}"),
                ),
            };
            let price = budget.prices.get(&estimate.judge_model).copied();
            let to_call = if is_cached { Some(0) } else { estimate.calls };
            let cost_usd = match (to_call, price) {
                (Some(0), _) => Some(0.0),
                (Some(_), Some(p)) => Some(
                    estimate.prompt_tokens as f64 * p.prompt_per_m / 1e6
                        + estimate.completion_tokens as f64 * p.completion_per_m / 1e6,
                ),
                (Some(_), None) if estimate.local => Some(0.0),
                _ => None,
            };
            plan.stages.push(StageJudgeCost {
                stage: stage.id.clone(),
                kind: stage.kind.clone(),
                estimate,
                cached: is_cached,
                to_call,
                price,
                cost_usd,
            });
        }
        plan.totals = totals(&plan.stages);
        Ok(plan)
    }

    /// The table for people and a `judge_cost` event for `--json`.
    pub fn print(&self, r: &Reporter) {
        if r.is_json() {
            r.event("judge_cost", json!(self));
        }
        if self.stages.is_empty() {
            r.line(&format!(
                "{:>8}  no planned stage calls a judge",
                r.bold("Judge")
            ));
            return;
        }
        r.line(&format!(
            "{:>8}  judge calls per stage (estimates: tokens ~ characters / 4 with answers at their token limit; `<=` marks an upper bound)",
            r.bold("Judge")
        ));
        let header = [
            "stage",
            "judge",
            "calls",
            "memoised",
            "prompt tokens",
            "completion tokens",
            "cost",
        ];
        let rows = self.rows();
        let mut width = header.map(str::len);
        for row in &rows {
            for (w, cell) in width.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let fmt = |cells: &[String; 7]| {
            let mut line = String::from("  ");
            for (k, (cell, w)) in cells.iter().zip(width).enumerate() {
                let pad = w - cell.chars().count();
                // Names left-aligned, numbers right-aligned.
                if matches!(k, 2 | 4 | 5) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
                line.push_str("  ");
            }
            line.trim_end().to_string()
        };
        r.line(&fmt(&header.map(String::from)));
        let n = rows.len();
        for (k, row) in rows.iter().enumerate() {
            if k + 1 == n {
                r.line(&format!(
                    "  {}",
                    "-".repeat(width.iter().sum::<usize>() + 12)
                ));
            }
            r.line(&fmt(row));
            // Notes once per run of rows that share them (matrix cells mostly do).
            let notes = self.stages.get(k).map(|s| &s.estimate.notes);
            let previous = k.checked_sub(1).and_then(|j| self.stages.get(j));
            if notes != previous.map(|s| &s.estimate.notes) {
                for note in notes.into_iter().flatten() {
                    r.line(&format!("      {note}"));
                }
            }
        }
        self.print_notes(r);
    }

    /// One row per stage, then the total row: stage, judge, calls, memoised, prompt tokens,
    /// completion tokens, cost.
    fn rows(&self) -> Vec<[String; 7]> {
        let mut rows: Vec<[String; 7]> = self
            .stages
            .iter()
            .map(|s| {
                let bound = if s.estimate.upper_bound { "<=" } else { "" };
                let (calls, prompt, completion) = match s.estimate.calls {
                    Some(c) => (
                        format!("{bound}{}", grouped(c)),
                        format!("{bound}{}", grouped(s.estimate.prompt_tokens)),
                        format!("{bound}{}", grouped(s.estimate.completion_tokens)),
                    ),
                    None => ("unknown".into(), "unknown".into(), "unknown".into()),
                };
                [
                    s.stage.clone(),
                    s.estimate.judge_model.clone(),
                    calls,
                    s.memoised_text(),
                    prompt,
                    completion,
                    s.cost_text(),
                ]
            })
            .collect();
        let t = &self.totals;
        let bound = if t.upper_bound { "<=" } else { "" };
        let unknown = if t.unknown_stages.is_empty() {
            String::new()
        } else {
            " + unknown".into()
        };
        let cost = if t.unpriced_models.is_empty() {
            format!("{}{unknown}", usd(t.cost_usd))
        } else if t.cost_usd > 0.0 {
            format!("{} + price not set", usd(t.cost_usd))
        } else {
            "price not set".into()
        };
        rows.push([
            "total (calls to make)".into(),
            String::new(),
            format!("{bound}{}{unknown}", grouped(t.to_call)),
            format!("{} in cached stages", grouped(t.memoised)),
            format!("{bound}{}{unknown}", grouped(t.prompt_tokens)),
            format!("{bound}{}{unknown}", grouped(t.completion_tokens)),
            cost,
        ]);
        rows
    }

    /// The lines under the table: stages without judges, missing prices, what could not be
    /// counted or previewed.
    fn print_notes(&self, r: &Reporter) {
        let t = &self.totals;
        if self.other_stages > 0 {
            r.line(&format!(
                "  {} other planned stage(s) call no judge",
                self.other_stages
            ));
        }
        for model in &t.unpriced_models {
            r.line(&format!(
                "  price not set for {model}: pass --judge-price {model}=IN/OUT (USD per million prompt/completion tokens) or set {PRICES_ENV}"
            ));
        }
        if !t.unknown_stages.is_empty() {
            r.line(&format!(
                "  not counted yet (their inputs do not exist before an upstream runs): {}",
                t.unknown_stages.join(", ")
            ));
        }
        for (stage, err) in &self.preview_failures {
            r.line(&format!("  could not preview {stage}: {err}"));
        }
    }

    /// `Err` naming the plan's totals and the limit when a run would exceed `budget`'s limits,
    /// or when a limit cannot be checked (calls not countable, or no price for a model).
    pub fn check(&self, budget: &JudgeBudget) -> anyhow::Result<()> {
        let t = &self.totals;
        let bound = if t.upper_bound {
            " (an upper bound: short answers get no grader call and early stopping can end an RL stage sooner)"
        } else {
            ""
        };
        let memo = if t.memoised > 0 {
            format!("; {} more are memoised in cached stages", t.memoised)
        } else {
            String::new()
        };
        // The counted calls alone can already be over the limit: refuse on them, whether or
        // not some stages cannot be counted yet (e.g. an eval whose questions a `command`
        // stage has not written).
        let uncounted = match t.unknown_stages.is_empty() {
            true => String::new(),
            false => format!(
                ", plus the calls of {} (not countable yet)",
                t.unknown_stages.join(", ")
            ),
        };
        if let Some(max) = budget.max_calls {
            if t.to_call > max {
                bail!(
                    "refusing to start: this run would make {} judge calls in total{bound}{memo}{uncounted}, over --max-judge-calls {max}; the most: {}. Raise the limit, run fewer stages (--only), or lower samples, questions or steps (`emflow plan` shows the table)",
                    t.to_call,
                    self.largest()
                );
            }
        }
        if budget.has_limits() && !t.unknown_stages.is_empty() {
            bail!(
                "cannot check the judge budget: the judge calls of {} are not known before their upstream runs; run the upstream first (`emflow run MANIFEST --only STAGE`) or drop --max-judge-calls/--max-judge-cost",
                t.unknown_stages.join(", ")
            );
        }
        if let Some(max) = budget.max_cost {
            if !t.unpriced_models.is_empty() {
                bail!(
                    "cannot check --max-judge-cost {}: no price for {}; pass --judge-price {}=IN/OUT (USD per million prompt/completion tokens) or set {PRICES_ENV}",
                    usd(max),
                    t.unpriced_models.join(", "),
                    t.unpriced_models[0]
                );
            }
            if t.cost_usd > max {
                bail!(
                    "refusing to start: this run's {} judge calls would cost {} in total{bound}{memo}, over --max-judge-cost {}; the most: {}. Raise the limit, run fewer stages (--only), or lower samples, questions or steps (`emflow plan` shows the table)",
                    t.to_call,
                    usd(t.cost_usd),
                    usd(max),
                    self.largest()
                );
            }
        }
        Ok(())
    }

    /// The three manifest stages (all their matrix cells together) with the most calls to
    /// make, for refusal messages: `grpo 72000 (12 instances)`.
    fn largest(&self) -> String {
        let mut by_stage: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
        for s in &self.stages {
            if let Some(c) = s.to_call.filter(|c| *c > 0) {
                let name = s.stage.split('[').next().unwrap_or(&s.stage);
                let e = by_stage.entry(name).or_default();
                e.0 += c;
                e.1 += 1;
            }
        }
        let mut sorted: Vec<(&str, (u64, usize))> = by_stage.into_iter().collect();
        sorted.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
        sorted
            .iter()
            .take(3)
            .map(|(s, (c, n))| match n {
                1 => format!("{s} {c}"),
                n => format!("{s} {c} ({n} instances)"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What `emflow run` does with the plan's judge calls before anything runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BeforeRun {
    /// `--dry-run`: print the table, and note what a real run would refuse.
    Report,
    /// A real run: an error naming the plan's total and the limit when the plan exceeds it
    /// (and a `judge_cost` event for `--json`). Nothing without a limit.
    Guard,
}

/// The judge calls of the stages in `statuses`, estimated and handled as `mode` says.
pub fn before_run(
    mode: BeforeRun,
    planner: &mut Planner,
    statuses: &[(usize, StageStatus)],
    budget: &JudgeBudget,
    r: &Reporter,
) -> anyhow::Result<()> {
    if mode == BeforeRun::Guard && !budget.has_limits() {
        return Ok(());
    }
    let plan = JudgeCostPlan::estimate(planner, statuses, budget)?;
    match mode {
        BeforeRun::Guard => {
            r.event("judge_cost", json!(plan));
            plan.check(budget)
        }
        BeforeRun::Report => {
            plan.print(r);
            if let Err(e) = plan.check(budget) {
                r.line(&format!("\nnote: a real run would not start: {e:#}"));
            }
            Ok(())
        }
    }
}

fn totals(stages: &[StageJudgeCost]) -> JudgeTotals {
    let mut t = JudgeTotals::default();
    for s in stages {
        if s.cached {
            t.memoised += s.estimate.calls.unwrap_or(0);
            continue;
        }
        let Some(calls) = s.to_call else {
            t.unknown_stages.push(s.stage.clone());
            continue;
        };
        t.to_call += calls;
        t.upper_bound |= s.estimate.upper_bound && calls > 0;
        t.prompt_tokens += s.estimate.prompt_tokens;
        t.completion_tokens += s.estimate.completion_tokens;
        match s.cost_usd {
            Some(c) => t.cost_usd += c,
            None => {
                if !t.unpriced_models.contains(&s.estimate.judge_model) {
                    t.unpriced_models.push(s.estimate.judge_model.clone());
                }
            }
        }
    }
    t
}

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn usd(v: f64) -> String {
    if v > 0.0 && v < 0.01 {
        format!("${v:.4}")
    } else {
        format!("${v:.2}")
    }
}

/// Plan-time previews of this command: one private staging folder of the store, removed
/// when planning ends.
#[derive(Default)]
struct Previews {
    staging: Option<Staging>,
    /// Stage index -> folder holding its previewed outputs.
    done: HashMap<usize, PathBuf>,
}

impl Previews {
    fn dir_for(&mut self, planner: &Planner, i: usize) -> anyhow::Result<PathBuf> {
        if self.staging.is_none() {
            self.staging = Some(
                planner
                    .store
                    .staging("judge-cost-preview")
                    .context("creating a folder for plan-time previews in the store")?,
            );
        }
        let root = match &self.staging {
            Some(s) => s.path().to_path_buf(),
            None => bail!("no preview folder"),
        };
        let dir = root.join(i.to_string());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the preview folder {}", dir.display()))?;
        Ok(dir)
    }
}

/// A plan-time artifact: a path with no digest yet.
fn plan_artifact(path: PathBuf, ty: ArtifactType, origin: &str) -> Artifact {
    Artifact {
        path,
        digest: String::new(),
        ty,
        origin: origin.to_string(),
    }
}

/// Output `output` of upstream stage `up`, from its record when cached, else from its preview.
fn stage_input(
    planner: &Planner,
    reader: &str,
    (up, output): (&str, &str),
    port_ty: ArtifactType,
    cached: &HashMap<usize, &StageRecord>,
    previews: &Previews,
) -> anyhow::Result<PlanInput> {
    let origin = format!("{up}.{output}");
    let j = planner
        .dag
        .index_of(up)
        .ok_or_else(|| anyhow!("stage {} reads unknown stage {up}", reader))?;
    let ty = planner
        .stage(j)
        .outputs
        .get(output)
        .copied()
        .unwrap_or(port_ty);
    let from_record = cached.get(&j).and_then(|rec| rec.outputs.get(output));
    let from_preview = previews
        .done
        .get(&j)
        .map(|d| d.join(output))
        .filter(|p| p.exists());
    Ok(match (from_record, from_preview) {
        (Some(entry), _) => PlanInput {
            artifact: Some(plan_artifact(
                planner.store.artifact_path(entry),
                ty,
                &origin,
            )),
            origin,
            ty,
            preview: false,
            model_source: None,
            waits_on: None,
            upstream_params: None,
        },
        (None, Some(path)) => PlanInput {
            artifact: Some(plan_artifact(path, ty, &origin)),
            origin,
            ty,
            preview: true,
            model_source: None,
            waits_on: None,
            upstream_params: None,
        },
        (None, None) => PlanInput {
            origin,
            ty,
            artifact: None,
            preview: false,
            model_source: None,
            waits_on: Some(up.to_string()),
            upstream_params: Some(planner.stage(j).params.clone()),
        },
    })
}

/// Model `name`: a local file or folder, or what the store fetched for it.
pub(crate) fn model_input(planner: &Planner, name: &str) -> PlanInput {
    let origin = format!("models.{name}");
    let decl = planner.pipeline.models.get(name);
    let path = match decl.map(|d| model_source(d, &planner.pipeline.manifest_dir)) {
        Some(ModelSource::Local(p)) if p.exists() => Some(p),
        Some(ModelSource::Fetched { .. }) => decl
            .and_then(|d| {
                planner
                    .store
                    .record(&model_fetch_key(&d.source))
                    .ok()
                    .flatten()
            })
            .and_then(|rec| {
                rec.outputs
                    .get("model")
                    .map(|e| planner.store.artifact_path(e))
            }),
        _ => None,
    };
    PlanInput {
        waits_on: path.is_none().then(|| origin.clone()),
        artifact: path.map(|p| plan_artifact(p, ArtifactType::Model, &origin)),
        origin,
        ty: ArtifactType::Model,
        preview: false,
        model_source: decl.map(|d| d.source.clone()),
        upstream_params: None,
    }
}

/// What stage `i`'s inputs are known to be now.
fn plan_inputs(
    planner: &Planner,
    i: usize,
    cached: &HashMap<usize, &StageRecord>,
    previews: &Previews,
) -> anyhow::Result<PlanInputs> {
    let stage = planner.stage(i);
    let spec = planner
        .spec(&stage.kind)
        .ok_or_else(|| anyhow!("unknown kind {}", stage.kind))?;
    let mut out = PlanInputs::default();
    for (port, refs) in &stage.inputs {
        let port_ty = spec.input_type(port);
        let mut list = Vec::with_capacity(refs.len());
        for r in refs {
            let input = match r {
                InputRef::Stage { stage: up, output } => {
                    stage_input(planner, &stage.id, (up, output), port_ty, cached, previews)?
                }
                InputRef::Model { name } => model_input(planner, name),
                InputRef::File { path } => {
                    let origin = format!("file:{}", path.display());
                    PlanInput {
                        artifact: path
                            .exists()
                            .then(|| plan_artifact(path.clone(), port_ty, &origin)),
                        waits_on: None,
                        origin,
                        ty: port_ty,
                        preview: false,
                        model_source: None,
                        upstream_params: None,
                    }
                }
            };
            list.push(input);
        }
        out.ports.insert(port.clone(), list);
    }
    Ok(out)
}
