//! The `report` kind: eval summaries (and optionally their judgments and samples) and training
//! metrics across conditions and seeds, as one self-contained HTML page (inline SVG plots), a
//! Markdown summary, and the same numbers as CSV and JSON. Aggregation, figures and exports
//! live in [`crate::report_html`]; this file reads inputs and writes files.

use anyhow::{bail, Context as _, Result};
use emflow_engine::{Kind, KindInfo, StageContext};
use schemars::JsonSchema;
use serde::Deserialize;

use super::defaults;
use crate::evaluation::{Summary, SUMMARY_SCHEMA};
use crate::report_html::page::{figure_plan, MetricsFile, PageData};
use crate::report_html::{aggregate, answers, export, margin, page, SummaryInput};

pub struct ReportKind;

/// The `report` kind's version; the page names it beside emflow's.
const KIND_VERSION: u32 = 2;

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
                 out  report     report     index.html, report.md, data.json, conditions.csv, per_question.csv (margin.csv with judge-free margins)",
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
        for r in &mut rows {
            r.judged = answers.get(&r.condition).map(|a| a.counts);
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
        let figures = figure_plan(&rows);
        let dir = ctx.output_path("report");
        std::fs::create_dir_all(&dir).context("creating the report folder")?;
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
        };
        write(
            "report.md",
            export::markdown(&p.title, &rows, &figures, &versions) + &margin::markdown(&rows),
        )?;
        let data = export::data_json(&rows, &figures, &answers, &versions);
        write("data.json", serde_json::to_string_pretty(&data)? + "\n")?;
        write("conditions.csv", export::conditions_csv(&rows))?;
        write("per_question.csv", export::per_question_csv(&rows))?;
        if margin::any(&rows) {
            write("margin.csv", margin::csv(&rows))?;
        }
        let page = PageData {
            title: &p.title,
            rows: &rows,
            answers: &answers,
            metrics: &metrics,
            versions: &versions,
        };
        write("index.html", page::html(&page))?;
        ctx.summarize("conditions", rows.len());
        ctx.summarize("figures", figures.len());
        ctx.summarize("metrics_files", metrics.len());
        Ok(())
    }
}

fn read_summaries(ctx: &StageContext) -> Result<Vec<SummaryInput>> {
    ctx.inputs("summaries")
        .iter()
        .map(|a| {
            let text = std::fs::read_to_string(&a.path)
                .with_context(|| format!("reading summary {}", a.origin))?;
            let summary: Summary = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an eval summary ({SUMMARY_SCHEMA}); wire an `eval` stage's `summary`", a.origin))?;
            Ok(SummaryInput {
                origin: a.origin.clone(),
                digest: a.digest.clone(),
                summary,
            })
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
