//! The `report` kind: eval summaries (and optionally their judgments and samples) and training
//! metrics across conditions and seeds, as one self-contained HTML page (inline SVG plots), a
//! Markdown summary, and the same numbers as CSV and JSON. Aggregation, figures and exports
//! live in [`crate::report_html`]; this file reads inputs and writes files.

use anyhow::{bail, Context as _, Result};
use emflow_engine::{Kind, KindInfo, StageContext};
use schemars::JsonSchema;
use serde::Deserialize;

use super::defaults;
use crate::evaluation::{Curve, Summary, CURVE_SCHEMA, SUMMARY_SCHEMA};
use crate::report_html::as_run::as_run_interval;
use crate::report_html::page::{figure_plan, MetricsFile, PageData};
use crate::report_html::training_curve::{self, CurveInput};
use crate::report_html::{
    aggregate, answers, condition_label, export, interleaving, margin, page, provenance,
    JudgedCounts, Provenance, SummaryInput,
};

pub struct ReportKind;

/// The `report` kind's version; the page names it beside emflow's.
// 3: EMA_RL's as-run rate carries a bootstrap interval (tables, CSV, data.json).
// 4: provenance per eval stage (key, model, adapter, data, judges) on the page, in report.md,
//    data.json and the new provenance.csv.
// 5: EM over training is one chart per question of the study, its legend the trained arm;
//    the curves of every RL family (`eval_snapshots_<family>`) end at their final eval.
const KIND_VERSION: u32 = 5;

/// The `report` kind's params (the engine derives the kind's spec from this struct).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    /// page title
    #[serde(default = "default_title")]
    title: String,
    /// resamples for the pooled 95% intervals
    #[serde(default = "defaults::int::<1000>")]
    bootstrap_resamples: usize,
    /// bootstrap seed
    #[serde(default)]
    seed: u64,
}

fn default_title() -> String {
    "emflow report".into()
}

impl Kind for ReportKind {
    type Params = ReportParams;

    fn describe(&self) -> KindInfo {
        KindInfo::new("report", KIND_VERSION, "Collect eval summaries and training metrics into an HTML page with one figure per claim, a Markdown summary, CSV and JSON")
            .ports(
                "in*  summaries  summary    eval summaries; stages differing only in `seed` are pooled
                 in*  judgments  judgments  eval judgments: judge failures told apart from refusals, example answers
                 in*  samples    samples    eval samples: the text of the example answers
                 in*  metrics    metrics    training metrics JSONL (reward, KL, loss curves)
                 in*  curves     summary    eval curves over training (an eval stage with `snapshots` wired): EM against the share of each arm's run
                 out  report     report     index.html, report.md, data.json, conditions.csv, per_question.csv, provenance.csv (margin.csv with judge-free margins)",
            )
    }

    fn run(&self, ctx: &mut StageContext, p: &ReportParams) -> Result<()> {
        let summaries = read_summaries(ctx)?;
        let metrics = read_metrics(ctx)?;
        if summaries.is_empty() && metrics.is_empty() {
            bail!("report has nothing to show: wire eval summaries into `summaries` and/or training metrics into `metrics`");
        }
        let located = |port: &str| -> Vec<(String, std::path::PathBuf)> {
            ctx.inputs(port)
                .iter()
                .map(|a| (a.origin.clone(), a.path.clone()))
                .collect()
        };
        let answers = answers::collect(&located("judgments"), &located("samples"))?;
        let mut rows = aggregate(&summaries, p.bootstrap_resamples, p.seed);
        margin::attach(&mut rows, &summaries, p.bootstrap_resamples, p.seed);
        for (i, r) in rows.iter_mut().enumerate() {
            r.judged = answers
                .get(&r.condition)
                .map(|a| with_as_run_interval(a, p, i));
            for p in &mut r.provenance {
                let stage = answers::stage_of(&p.origin);
                p.judgments_digest = ctx
                    .inputs("judgments")
                    .iter()
                    .find(|j| answers::stage_of(&j.origin) == stage)
                    .map(|j| j.digest.clone());
            }
        }
        let versions = format!(
            "emflow {}, report kind v{KIND_VERSION}",
            env!("CARGO_PKG_VERSION")
        );
        let curve_inputs = read_curves(ctx)?;
        let curve_provenance = curve_provenance(&curve_inputs);
        let curves = training_curve::pool(&curve_inputs, p.bootstrap_resamples, p.seed);
        let lines = provenance::lines(&rows, &curve_provenance);
        let figures = figure_plan(&rows);
        let dir = ctx.output_path("report");
        std::fs::create_dir_all(&dir).context("creating the report folder")?;
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
        };
        let md = export::markdown(&p.title, &rows, &figures, &versions)
            + &training_curve::markdown(&curves, &rows)
            + &margin::markdown(&rows)
            + &interleaving::markdown_section(&metrics)
            + &provenance::markdown(&lines);
        write("report.md", md)?;
        let data = export::data_json(&rows, &figures, &answers, &versions, &curve_provenance);
        write("data.json", serde_json::to_string_pretty(&data)? + "\n")?;
        write("conditions.csv", export::conditions_csv(&rows))?;
        write("per_question.csv", export::per_question_csv(&rows))?;
        write("provenance.csv", provenance::csv(&lines))?;
        if margin::any(&rows) {
            write("margin.csv", margin::csv(&rows))?;
        }
        let page = PageData {
            title: &p.title,
            rows: &rows,
            answers: &answers,
            metrics: &metrics,
            versions: &versions,
            curves: &curves,
            curve_provenance: &curve_provenance,
        };
        write("index.html", page::html(&page))?;
        ctx.summarize("conditions", rows.len());
        ctx.summarize("figures", figures.len());
        ctx.summarize("metrics_files", metrics.len());
        ctx.summarize("training_curves", curves.len());
        Ok(())
    }
}

/// A condition's judged counts with EMA_RL's as-run rate's interval, seeded per condition
/// (`index` in the table) apart from the other rates' streams.
fn with_as_run_interval(
    a: &answers::ConditionAnswers,
    p: &ReportParams,
    index: usize,
) -> JudgedCounts {
    let seed = p.seed ^ 0xA5_2D_4E_11 ^ index as u64;
    JudgedCounts {
        as_run_interval: as_run_interval(&a.strata, p.bootstrap_resamples, seed),
        ..a.counts
    }
}

/// Every input of `port`, parsed as JSON of type `T` (`what` and `hint` name it in errors).
fn read_json_inputs<'c, T: serde::de::DeserializeOwned>(
    ctx: &'c StageContext,
    port: &str,
    what: &str,
    hint: &str,
) -> Result<Vec<(&'c emflow_engine::context::Artifact, T)>> {
    ctx.inputs(port)
        .iter()
        .map(|a| {
            let text = std::fs::read_to_string(&a.path)
                .with_context(|| format!("reading {what} {}", a.origin))?;
            let value: T = serde_json::from_str(&text)
                .with_context(|| format!("{} is not {hint}", a.origin))?;
            Ok((a, value))
        })
        .collect()
}

fn read_summaries(ctx: &StageContext) -> Result<Vec<SummaryInput>> {
    let hint = format!("an eval summary ({SUMMARY_SCHEMA}); wire an `eval` stage's `summary` (an eval over `snapshots` writes a curve: wire it into `curves`)");
    let read = read_json_inputs::<Summary>(ctx, "summaries", "summary", &hint)?;
    Ok(read
        .into_iter()
        .map(|(a, summary)| SummaryInput {
            origin: a.origin.clone(),
            digest: a.digest.clone(),
            summary,
        })
        .collect())
}

fn read_curves(ctx: &StageContext) -> Result<Vec<CurveInput>> {
    let hint = format!("an eval curve ({CURVE_SCHEMA}); wire the `summary` of an `eval` stage whose input `snapshots` is wired");
    let read = read_json_inputs::<Curve>(ctx, "curves", "curve", &hint)?;
    Ok(read
        .into_iter()
        .map(|(a, curve)| CurveInput::new(&a.origin, &a.digest, curve))
        .collect())
}

/// Each curve's provenance, with its arm's label (the curve's stage without its seed).
fn curve_provenance(curves: &[CurveInput]) -> Vec<(String, Provenance)> {
    curves
        .iter()
        .map(|c| {
            let p = Provenance::of(&c.origin, &c.digest, c.curve.provenance.as_ref());
            (condition_label(&c.origin), p)
        })
        .collect()
}

fn read_metrics(ctx: &StageContext) -> Result<Vec<MetricsFile>> {
    ctx.inputs("metrics")
        .iter()
        .map(|a| {
            let rows = crate::formats::jsonl::read_objects(&a.path, &a.origin)?;
            Ok(MetricsFile {
                origin: a.origin.clone(),
                rows: rows.into_iter().map(|(_, r)| r).collect(),
            })
        })
        .collect()
}
