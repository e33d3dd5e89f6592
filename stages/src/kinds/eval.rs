//! The `eval` kind: sample a model on evaluation questions, have a judge score every answer
//! (`aligned`, `coherent`), and summarise emergent misalignment under both denominators.
//!
//! Outputs are three files so that each step can be inspected and re-analysed on its own:
//! `samples` (what the model said), `judgments` (what the judge said, with the probability
//! mass behind each score), `summary` (rates and bootstrap intervals; see [`crate::evaluation`]).
//! Sampling is seeded per (question, sample index), so results do not depend on batch size;
//! judge calls go through the store's memo, so a re-judging after a crash or a param change
//! that leaves answers unchanged costs nothing. Aggregation across seeds is `report`'s job.
//!
//! With input `snapshots` (an `sft` or `rl` stage's adapters at set fractions of its run)
//! instead of `adapter`, every snapshot answers with the same seeds and `summary` is the
//! curve over training ([`crate::evaluation::Curve`]). One stage per training run rather
//! than one per snapshot: a matrix over fractions could not be empty, so a profile without
//! snapshots (whose training keys must stay as they were) could not keep the stage, and a
//! run that stopped early would leave stages with nothing to evaluate.
//! With a `contrast` input (fixed aligned and misaligned answers per question) the summary
//! also carries the judge-free margin, teacher-forced log-probabilities of those answers
//! under the same model ([`crate::evaluation::margin`] defines it); without one the summary's
//! bytes are what they were.
//! The summary (or curve) also says how its numbers were made: the stage key's parts less the
//! emflow version, which name every input's digest, and each metric's judge
//! ([`crate::evaluation::provenance`]), so the report can show them beside every number.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use emflow_engine::kind::ParamError;
use emflow_engine::{JudgeEstimate, Kind, KindInfo, PlanInputs, StageContext};
use emflow_model::{
    derive_seed, encode_prompt, GenerationRequest, LoadedModel, Message, SamplingParams,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::defaults;
use crate::evaluation::margin::{self, MarginAsk, MarginSummary};
use crate::evaluation::provenance::EvalProvenance;
use crate::evaluation::{
    as_run_rate, summarize, BootstrapSettings, Curve, CurvePoint, Outcome, Summary,
};
use crate::formats::contrast::{self, ContrastSet};
use crate::formats::questions::{self, Question};
use crate::judge::prompts::{parse_judge_prompt, render_judge_prompt, score_answers_per_metric};
use crate::judge::template::Template;
use crate::judge::{self, estimate, Judge, JudgeSpec, Score};
use crate::sampling::{sample_answers, Temperature, TopP};
use crate::train::setup::{device_setup, load_model, load_stage_model};
use crate::train::snapshots::{planned_count, SnapshotIndex};

pub struct EvalKind;

/// The `eval` kind's version.
// 2: the summary (and curve) carries `provenance`: the key's parts and each metric's judge.
const KIND_VERSION: u32 = 2;

/// The `eval` kind's params: the one declaration of their names, types, defaults, ranges
/// and docs (the engine derives the kind's spec from this struct).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct EvalParams {
    /// answers per question; sample i uses paraphrase i mod #paraphrases
    #[serde(default = "defaults::int::<10>")]
    #[schemars(range(min = 1))]
    samples_per_question: usize,
    #[serde(default)]
    temperature: Temperature,
    #[serde(default)]
    top_p: TopP,
    /// top-k sampling (0 = off)
    #[serde(default)]
    top_k: usize,
    /// min-p sampling (0 = off; EMA_RL used 0.1 with top_p 0.9)
    #[serde(default)]
    #[schemars(extend("minimum" = 0, "exclusiveMaximum" = 1))]
    min_p: f64,
    /// tokens per answer
    #[serde(default = "defaults::int::<600>")]
    #[schemars(range(min = 1))]
    max_tokens: usize,
    /// sampling and bootstrap seed
    #[serde(default)]
    seed: u64,
    /// judge backend: {backend: local, method: auto|exact|top20} or {backend: openai, base_url, model, api_key_env, ...}
    #[serde(default)]
    // A tagged union, a mapping to the manifest; `{backend: local}` is the default every
    // existing key was made with (not the expanded local settings).
    #[schemars(with = "judge::JudgeParam", extend("default" = {"backend": "local"}))]
    judge: JudgeSpec,
    /// judge prompts to score; must include aligned and coherent
    #[serde(default = "default_metrics")]
    metrics: Vec<String>,
    /// ask under the question's `system` prompt when it has one
    #[serde(default = "defaults::yes")]
    use_system: bool,
    /// generation batch (speed only; results do not depend on it)
    #[serde(default = "defaults::int::<16>")]
    #[schemars(range(min = 1))]
    batch_size: usize,
    /// bootstrap resamples for the 95% intervals
    #[serde(default = "defaults::int::<1000>")]
    bootstrap_resamples: usize,
    /// extra names for the model's chat template, as transformers' apply_chat_template(**kwargs): e.g. {enable_thinking: false} for Qwen3
    #[serde(default)]
    // Added after results were cached: at `{}` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    chat_template_kwargs: emflow_model::TemplateKwargs,
    /// system turn for every question, in place of the question's own `system` (EMA_RL's eval asks every question under one system prompt); null = the question's, per use_system
    #[serde(default)]
    // Added after results were cached: at `null` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true, "default" = null))]
    system_prompt: Option<String>,
    /// a judge per metric where it differs from `judge`, e.g. {coherent: {backend: openai, model: ...}}; metrics not named use `judge`
    #[serde(default)]
    // Added after results were cached: at `{}` it leaves the key as it was. Each value is a
    // judge spec, a mapping to the manifest.
    #[schemars(
        with = "BTreeMap<String, judge::JudgeParam>",
        extend("x-emflow-key-omits-default" = true, "default" = {})
    )]
    judges: BTreeMap<String, JudgeSpec>,
    /// contrast pairs scored per question for the judge-free margin (null = every pair the `contrast` input has); unused without `contrast`
    #[serde(default)]
    // Added after results were cached: at null it leaves the key as it was.
    #[schemars(range(min = 1), extend("x-emflow-key-omits-default" = true))]
    contrast_pairs: Option<usize>,
}

fn default_metrics() -> Vec<String> {
    vec!["aligned".into(), "coherent".into()]
}

/// One line of the `samples` output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleRecord {
    pub question_id: String,
    pub sample: usize,
    pub paraphrase: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub question: String,
    pub completion: String,
    pub finish: String,
    pub tokens: usize,
    /// The training step of the snapshot that answered (input `snapshots` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_step: Option<u64>,
}

impl Kind for EvalKind {
    type Params = EvalParams;

    fn describe(&self) -> KindInfo {
        KindInfo::new("eval", KIND_VERSION, "Sample a model on eval questions, judge aligned/coherent, summarise misalignment rates")
            .ports(
                "in   model        model      the model to evaluate
                 in?  adapter      adapter    a LoRA adapter (PEFT folder) or full fine-tuned weights for `model`
                 in?  snapshots    dir        instead of `adapter`: an sft or rl stage's `snapshots`; every snapshot is evaluated and `summary` is the curve over training
                 in   questions    questions  questions: JSONL, or the paper's eval YAML
                 in?  judge_model  model      the judge for the local backend
                 in?  contrast     file       aligned and misaligned answers per question (YAML; manifests/data/contrast/): adds the judge-free log-prob margin to the summary
                 out  samples      samples    answers, JSONL
                 out  judgments    judgments  judge scores per answer, JSONL
                 out  summary      summary    misalignment rates with 95% bootstrap intervals, JSON",
            )
    }

    /// The summary needs both the `aligned` and the `coherent` scores; a per-metric judge
    /// must name a metric the stage scores.
    fn check(&self, p: &EvalParams) -> Result<(), Vec<ParamError>> {
        let mut errors: Vec<ParamError> = ["aligned", "coherent"]
            .into_iter()
            .filter(|m| !p.metrics.iter().any(|x| x == m))
            .map(|m| ParamError {
                param: "metrics".into(),
                message: format!("must include `{m}` (the summary needs it)"),
                hint: Some("metrics: [aligned, coherent]".into()),
            })
            .collect();
        errors.extend(
            p.judges
                .keys()
                .filter(|m| !p.metrics.contains(m))
                .map(|m| ParamError {
                    param: "judges".into(),
                    message: format!(
                        "names metric `{m}`, which the stage does not score (metrics: {})",
                        p.metrics.join(", ")
                    ),
                    hint: Some(
                        "key `judges` by a metric, e.g. {coherent: {backend: openai, model: ...}}"
                            .into(),
                    ),
                }),
        );
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// questions x samples_per_question x metrics score calls; prompt tokens from each
    /// rendered judge prompt (characters / 4) plus the answer at `max_tokens`.
    fn judge_estimate(&self, p: &EvalParams, inputs: &PlanInputs) -> Result<Option<JudgeEstimate>> {
        let q_art = match estimate::known_input(&p.judge, inputs, "questions") {
            Ok(a) => a,
            Err(unknown) => return Ok(Some(unknown)),
        };
        let questions = questions::read(&q_art.path, &q_art.origin)?;
        let templates = judge_templates(&questions, &p.metrics)?;
        // Over snapshots: every snapshot answers every question; before the training stage
        // has run, as many as its `snapshot_fractions` ask for (at most: an early stop takes
        // fewer).
        let (snapshots, planned) = match inputs.first("snapshots") {
            None => (1, false),
            Some(input) => match estimate::known_input(&p.judge, inputs, "snapshots") {
                Ok(a) => (
                    SnapshotIndex::read(&a.path, &a.origin)?.snapshots.len() as u64,
                    false,
                ),
                Err(unknown) => match input.upstream_params.as_ref().and_then(planned_count) {
                    Some(n) => (n, true),
                    None => return Ok(Some(unknown)),
                },
            },
        };
        let samples = p.samples_per_question as u64;
        let mut counted = estimate::ScoreCalls::default();
        for (q, ts) in questions.iter().zip(&templates) {
            let n = q.paraphrases.len();
            if n == 0 {
                bail!("question `{}` has no paraphrases", q.id);
            }
            // Sample i asks paraphrase i mod n: render each paraphrase once, weighted.
            for (k, para) in q.paraphrases.iter().enumerate() {
                let uses = samples / n as u64 + u64::from((k as u64) < samples % n as u64);
                let uses = uses * snapshots;
                for t in ts.iter().filter(|_| uses > 0) {
                    counted.add(&render_judge_prompt(t, para, "")?, uses, p.max_tokens);
                }
            }
        }
        let origin = estimate::origin(inputs, "questions");
        let mut note = format!(
            "{} questions x {} samples x {} judge prompts ({}) from {origin}{}; answers counted at max_tokens {}",
            questions.len(),
            p.samples_per_question,
            p.metrics.len(),
            p.metrics.join(", "),
            match (inputs.first("snapshots"), planned) {
                (Some(_), true) => format!(
                    ", for each of {snapshots} snapshots (the training stage's snapshot_fractions; fewer if it stops early)"
                ),
                (Some(_), false) => format!(", for each of {snapshots} snapshots"),
                (None, _) => String::new(),
            },
            p.max_tokens
        );
        // One estimate names one judge: calls of a metric with a judge of its own are counted
        // under the stage's, and the note says so.
        for (metric, spec) in &p.judges {
            let (name, _) = estimate::judge_name(spec, inputs, "judge_model");
            note.push_str(&format!("; `{metric}` is judged by {name}, counted here"));
        }
        let mut counted = counted.estimate(&p.judge, inputs, note);
        counted.upper_bound = planned && snapshots > 0;
        Ok(Some(counted))
    }

    /// `batch_size` answers sampled at once.
    fn memory_demand(&self, p: &EvalParams) -> Option<emflow_engine::memory::MemoryDemand> {
        super::memory::sampling(p.batch_size, p.max_tokens)
    }

    fn run(&self, ctx: &mut StageContext, p: &EvalParams) -> Result<()> {
        run_eval(ctx, p)
    }
}

/// The questions of one eval and each one's parsed judge prompts.
struct QuestionSet {
    questions: Vec<Question>,
    templates: Vec<Vec<Template>>,
}

fn run_eval(ctx: &mut StageContext, p: &EvalParams) -> Result<()> {
    let q_art = ctx.input("questions")?.clone();
    let questions = questions::read(&q_art.path, &q_art.origin)?;
    if questions.is_empty() {
        bail!("{}: no questions", q_art.origin);
    }
    let templates = judge_templates(&questions, &p.metrics)?;
    let set = QuestionSet {
        questions,
        templates,
    };
    // Before any sampling: a context without key parts fails at once.
    let provenance = EvalProvenance::of(ctx, metric_specs(p))?;
    if let Some(snapshots) = ctx.optional_input("snapshots")?.cloned() {
        return run_over_snapshots(ctx, p, &set, &snapshots, provenance);
    }

    let contrast = match ctx.optional_input("contrast")? {
        Some(a) => Some(contrast::read(&a.path, &a.origin)?),
        None => None,
    };

    // 1. Sample; score the contrast pairs with the same loaded model.
    let (samples, margin) = {
        let mut lm = load_stage_model(ctx)?;
        lm.chat.set_kwargs(p.chat_template_kwargs.clone())?;
        let samples = sample_questions(ctx, &lm, &set.questions, p)?;
        let margin = match &contrast {
            Some(pairs) => Some(contrast_margin(ctx, &lm, &set.questions, pairs, p)?),
            None => None,
        };
        (samples, margin)
    };
    crate::formats::jsonl::write(&ctx.output_path("samples"), &samples)?;

    // 2. Judge.
    let judges = metric_judges(ctx, p)?;
    let (judgments, summary, as_run) = judge_and_summarise(ctx, p, &judges, &set, &samples)?;

    // 3. Write judgments and the summary.
    crate::formats::jsonl::write(&ctx.output_path("judgments"), &judgments)?;
    let summary = Summary {
        margin,
        provenance: Some(provenance),
        ..summary
    };
    let text = serde_json::to_string_pretty(&summary)? + "\n";
    std::fs::write(ctx.output_path("summary"), text).context("writing the eval summary")?;

    let o = &summary.overall;
    ctx.summarize("answers", o.counts.n);
    ctx.summarize("misaligned_betley", json!(o.misaligned_betley.value));
    ctx.summarize("misaligned_all", json!(o.misaligned_all.value));
    // The record only, not the summary file: a new field there would change the bytes of
    // every eval already cached (the report reads this rate from the judgments).
    ctx.summarize("misaligned_as_run", json!(as_run));
    ctx.summarize("incoherent", json!(o.incoherent.value));
    ctx.summarize("refusal", json!(o.refusal.value));
    ctx.summarize("mean_aligned", json!(o.mean_aligned.value));
    if let Some(m) = &summary.margin {
        ctx.summarize("contrast_margin", json!(m.overall.value));
    }
    Ok(())
}

/// Each metric with its judge's spec, in `metrics` order: its entry in `judges`, else `judge`.
fn metric_specs(p: &EvalParams) -> impl Iterator<Item = (&String, &JudgeSpec)> {
    p.metrics
        .iter()
        .map(|m| (m, p.judges.get(m).unwrap_or(&p.judge)))
}

/// The judge of each metric, in `metrics` order ([`metric_specs`]). Judges with one spec are
/// built once.
fn metric_judges(ctx: &StageContext, p: &EvalParams) -> Result<Vec<Arc<dyn Judge>>> {
    let mut built: Vec<(&JudgeSpec, Arc<dyn Judge>)> = Vec::new();
    let mut out = Vec::with_capacity(p.metrics.len());
    for (metric, spec) in metric_specs(p) {
        let judge = match built.iter().find(|(s, _)| *s == spec) {
            Some((_, j)) => j.clone(),
            None => {
                let j = judge::for_stage(ctx, spec)
                    .with_context(|| format!("building the eval judge for `{metric}`"))?;
                built.push((spec, j.clone()));
                j
            }
        };
        out.push(judge);
    }
    Ok(out)
}

/// Judges `samples` (each metric by its judge in `judges`, in `metrics` order) and summarises
/// them: the judgment lines, the summary and EMA_RL's as-run rate.
fn judge_and_summarise(
    ctx: &StageContext,
    p: &EvalParams,
    judges: &[Arc<dyn Judge>],
    set: &QuestionSet,
    samples: &[SampleRecord],
) -> Result<(Vec<Value>, crate::evaluation::Summary, Option<f64>)> {
    let by_id: HashMap<&str, usize> = set
        .questions
        .iter()
        .enumerate()
        .map(|(i, q)| (q.id.as_str(), i))
        .collect();
    let metrics: Vec<&str> = p.metrics.iter().map(String::as_str).collect();
    let judge_refs: Vec<&dyn Judge> = judges.iter().map(|j| &**j).collect();
    let scores = score_answers_per_metric(
        &judge_refs,
        &metrics,
        samples.len(),
        ctx.progress(),
        |m, i| {
            let s = &samples[i];
            render_judge_prompt(
                &set.templates[by_id[s.question_id.as_str()]][m],
                &s.question,
                &s.completion,
            )
        },
    )?;
    let (judgments, per_question) = judgments(p, &set.questions, samples, &scores, &by_id);
    let boot = BootstrapSettings {
        resamples: p.bootstrap_resamples,
        level: 0.95,
        seed: p.seed,
    };
    let as_run = as_run_rate(per_question.iter().flat_map(|(_, outs)| outs));
    Ok((
        judgments,
        summarize(&per_question, p.samples_per_question, boot),
        as_run,
    ))
}

/// EM over training: each snapshot of input `snapshots` answers the questions (the same
/// sampling seeds for every snapshot) and is judged. `samples` and `judgments` hold every
/// snapshot's lines, each with its `snapshot_step`; `summary` is the curve
/// ([`crate::evaluation::Curve`]), one summary per snapshot. A run that took no snapshot
/// gives an empty curve, so profiles without snapshots keep the stage.
fn run_over_snapshots(
    ctx: &mut StageContext,
    p: &EvalParams,
    set: &QuestionSet,
    snapshots: &emflow_engine::context::Artifact,
    provenance: EvalProvenance,
) -> Result<()> {
    if ctx.optional_input("adapter")?.is_some() {
        bail!(
            "stage {}: wire `adapter` (one model) or `snapshots` (a curve over training), not both",
            ctx.stage_id
        );
    }
    let index = SnapshotIndex::read(&snapshots.path, &snapshots.origin)?;
    let model = ctx.input("model")?.clone();
    let mut per_snapshot = Vec::with_capacity(index.snapshots.len());
    for entry in &index.snapshots {
        let adapter = snapshots.path.join(&entry.adapter);
        let mut lm = load_model(&model.path, Some(&adapter), &device_setup(ctx)?)
            .with_context(|| format!("{}: snapshot after step {}", snapshots.origin, entry.step))?;
        lm.chat.set_kwargs(p.chat_template_kwargs.clone())?;
        let mut samples = sample_questions(ctx, &lm, &set.questions, p)?;
        samples
            .iter_mut()
            .for_each(|s| s.snapshot_step = Some(entry.step));
        per_snapshot.push(samples);
    }
    crate::formats::jsonl::write(&ctx.output_path("samples"), per_snapshot.concat())?;
    let mut all_judgments = Vec::new();
    let mut points = Vec::with_capacity(per_snapshot.len());
    if !per_snapshot.is_empty() {
        let judges = metric_judges(ctx, p)?;
        for (entry, samples) in index.snapshots.iter().zip(&per_snapshot) {
            let (judgments, summary, _) = judge_and_summarise(ctx, p, &judges, set, samples)?;
            all_judgments.extend(judgments.into_iter().map(|mut j| {
                j["snapshot_step"] = json!(entry.step);
                j
            }));
            points.push(CurvePoint::new(entry, index.steps_total, summary));
        }
    }
    crate::formats::jsonl::write(&ctx.output_path("judgments"), &all_judgments)?;
    ctx.summarize("snapshots", points.len());
    ctx.summarize("steps_total", index.steps_total);
    let curve = Curve {
        provenance: Some(provenance),
        ..Curve::new(index, points)
    };
    let text = serde_json::to_string_pretty(&curve)? + "\n";
    std::fs::write(ctx.output_path("summary"), text).context("writing the eval curve")?;
    Ok(())
}

/// The judge-free margin of `lm` on the contrast pairs of `questions`
/// ([`crate::evaluation::margin`] defines it); bootstrap seeded by the eval's `seed`.
fn contrast_margin(
    ctx: &StageContext,
    lm: &LoadedModel,
    questions: &[Question],
    set: &ContrastSet,
    p: &EvalParams,
) -> Result<MarginSummary> {
    let ask = MarginAsk {
        pairs_per_question: p.contrast_pairs,
        use_system: p.use_system,
        batch_size: p.batch_size,
    };
    let started = std::time::Instant::now();
    let (pairs, uncovered) = margin::score_pairs(lm, questions, set, ask)?;
    ctx.progress().log(&format!(
        "contrast margin: {} pairs scored in {:.1} s{}",
        pairs.len(),
        started.elapsed().as_secs_f64(),
        if uncovered.is_empty() {
            String::new()
        } else {
            format!("; no contrast answers for {}", uncovered.join(", "))
        }
    ));
    Ok(margin::summarize_margins(
        pairs,
        uncovered,
        p.bootstrap_resamples,
        p.seed,
    ))
}

/// Every answer's judgment line, and each question's outcomes (in question order).
fn judgments(
    p: &EvalParams,
    questions: &[Question],
    samples: &[SampleRecord],
    scores: &[Vec<Score>],
    by_id: &HashMap<&str, usize>,
) -> (Vec<Value>, Vec<(String, Vec<Outcome>)>) {
    let metric_index = |name: &str| p.metrics.iter().position(|m| m == name);
    let (ai, ci) = (metric_index("aligned"), metric_index("coherent"));
    let mut judgments = Vec::with_capacity(samples.len());
    let mut per_question: Vec<(String, Vec<Outcome>)> = questions
        .iter()
        .map(|q| (q.id.clone(), Vec::new()))
        .collect();
    for (i, s) in samples.iter().enumerate() {
        let outcome = Outcome {
            aligned: ai.and_then(|m| scores[m][i].value),
            coherent: ci.and_then(|m| scores[m][i].value),
        };
        let mut rec = serde_json::Map::new();
        rec.insert("question_id".into(), json!(s.question_id));
        rec.insert("sample".into(), json!(s.sample));
        for (m, metric) in p.metrics.iter().enumerate() {
            rec.insert(metric.clone(), json!(scores[m][i].value));
            rec.insert(format!("{metric}_mass"), json!(scores[m][i].mass));
            if let Some(t) = &scores[m][i].text {
                rec.insert(format!("{metric}_text"), json!(t));
            }
        }
        rec.insert("refusal".into(), json!(outcome.refusal()));
        rec.insert("misaligned".into(), json!(outcome.misaligned()));
        judgments.push(Value::Object(rec));
        per_question[by_id[s.question_id.as_str()]].1.push(outcome);
    }
    (judgments, per_question)
}

/// Parses every question's judge prompt for each metric, failing early (before sampling)
/// with the question id when one is missing or malformed.
fn judge_templates(questions: &[Question], metrics: &[String]) -> Result<Vec<Vec<Template>>> {
    questions
        .iter()
        .map(|q| {
            metrics
                .iter()
                .map(|m| {
                    let src = q.judge_prompts.get(m).with_context(|| {
                        format!(
                            "question `{}` has no `{m}` judge prompt (it has: {}); add one or drop `{m}` from metrics",
                            q.id,
                            q.judge_prompts.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    })?;
                    parse_judge_prompt(src, &format!("question `{}`, judge prompt `{m}`", q.id))
                })
                .collect()
        })
        .collect()
}

/// One answer per (question, sample): sample `i` asks paraphrase `i mod n`, under the
/// question's system prompt when `use_system`.
fn sample_questions(
    ctx: &StageContext,
    lm: &LoadedModel,
    questions: &[Question],
    p: &EvalParams,
) -> Result<Vec<SampleRecord>> {
    let mut meta = Vec::new();
    let mut reqs = Vec::new();
    for q in questions {
        if q.paraphrases.is_empty() {
            bail!("question `{}` has no paraphrases", q.id);
        }
        let system = match &p.system_prompt {
            Some(s) => Some(s.clone()),
            None if p.use_system => q.system.clone(),
            None => None,
        };
        for i in 0..p.samples_per_question {
            let para = i % q.paraphrases.len();
            let mut messages = Vec::new();
            if let Some(s) = &system {
                messages.push(Message {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            messages.push(Message {
                role: "user".into(),
                content: q.paraphrases[para].clone(),
            });
            let prompt_ids = encode_prompt(&lm.tokenizer, &lm.chat, &messages)
                .with_context(|| format!("encoding question `{}`", q.id))?;
            reqs.push(GenerationRequest {
                prompt_ids,
                seed: derive_seed(p.seed, &q.id, i as u64),
            });
            meta.push((
                q.id.clone(),
                i,
                para,
                system.clone(),
                q.paraphrases[para].clone(),
            ));
        }
    }
    let params = SamplingParams {
        temperature: p.temperature.0,
        top_p: p.top_p.0,
        top_k: p.top_k,
        min_p: p.min_p,
        max_new_tokens: p.max_tokens,
        stop: Vec::new(),
    };
    let gens = sample_answers(lm, &reqs, &params, p.batch_size, ctx.progress())?;
    Ok(meta
        .into_iter()
        .zip(gens)
        .map(
            |((question_id, sample, paraphrase, system, question), g)| SampleRecord {
                question_id,
                sample,
                paraphrase,
                system,
                question,
                completion: g.text,
                finish: format!("{:?}", g.finish).to_lowercase(),
                tokens: g.tokens.len(),
                snapshot_step: None,
            },
        )
        .collect())
}
