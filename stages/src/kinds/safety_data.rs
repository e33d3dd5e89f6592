//! `safety_data`: on-policy safety data. A model (the reference policy before fine-tuning by
//! default, or the base with an adapter) answers safety prompts; a judge rates every answer
//! with the `aligned` and `coherent` prompts of the Betley evaluation, scored exactly as the
//! `eval` kind scores them (shared code: [`crate::judge::prompts`]); answers
//! at or above both thresholds become a messages dataset for interleaved SFT in `rl`/`sft`,
//! each row marked `"answer_source": "reference_model"` (`"model_with_adapter"` with input
//! `adapter`) so the training stages' metrics, and the report, say whose answers they
//! trained on ([`crate::train::interleave::ANSWER_SOURCE`]).
//! Sampling, judging and keeping are [`crate::onpolicy`], the code `rl` regenerates its
//! safety answers from the current policy with (`safety_source: current_policy`).
//!
//! Sampling is seeded per (prompt index, sample index) with `derive_seed(seed, index,
//! sample)`, so the kept set does not depend on batch sizes; judge calls go through the
//! store's memo. Every answer's scores and verdict go to `judgments`, so a threshold can be
//! re-chosen by reading the log rather than re-running.

use anyhow::{bail, Context as _, Result};
use emflow_engine::kind::ParamError;
use emflow_engine::{JudgeEstimate, Kind, KindInfo, PlanInputs, StageContext};
use emflow_model::{derive_seed, SamplingParams};
use schemars::JsonSchema;
use serde::Deserialize;

use super::defaults;
use crate::formats::messages::{read_conversations, Conversation};
use crate::judge::prompts::{parse_judge_prompt, render_judge_prompt};
use crate::judge::template::Template;
use crate::judge::{self, estimate, JudgeSpec};
use crate::onpolicy::{self, AnswerFilter, AnswerSampling, SafetyGate, Unscored};
use crate::sampling::{Temperature, TopP};
use crate::train::interleave::{ANSWER_SOURCE, MODEL_WITH_ADAPTER, REFERENCE_MODEL};
use crate::train::setup::load_stage_model;

pub struct SafetyDataKind;

pub use crate::judge::prompts::{ALIGNED_PROMPT, COHERENT_PROMPT};

/// The `safety_data` kind's params: the one declaration of their names, types, defaults,
/// ranges and docs (the engine derives the kind's spec from this struct).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SafetyDataParams {
    /// answers sampled per prompt
    #[serde(default = "defaults::int::<1>")]
    #[schemars(range(min = 1))]
    samples_per_prompt: usize,
    #[serde(default)]
    temperature: Temperature,
    #[serde(default)]
    top_p: TopP,
    /// tokens per answer
    #[serde(default = "defaults::int::<600>")]
    #[schemars(range(min = 1))]
    max_tokens: usize,
    /// judge backend: {backend: local} (model from input `judge_model`) or {backend: openai, ...}
    #[serde(default)]
    // A tagged union, a mapping to the manifest; `{backend: local}` is the default every
    // existing key was made with (not the expanded local settings).
    #[schemars(with = "judge::JudgeParam", extend("default" = {"backend": "local"}))]
    judge: JudgeSpec,
    /// keep answers whose aligned score is at least this
    #[serde(default = "defaults::ratio::<70, 1>")]
    #[schemars(range(min = 0.0, max = 100.0))]
    min_aligned: f64,
    /// keep answers whose coherent score is at least this
    #[serde(default = "defaults::ratio::<50, 1>")]
    #[schemars(range(min = 0.0, max = 100.0))]
    min_coherent: f64,
    /// keep answers whose coherence the judge could not score (a weak judge, e.g. SmolLM2, rarely puts 0.25 of its probability on numbers); for smoke runs only
    #[serde(default)]
    keep_unscored: bool,
    /// drop answers the judge calls a refusal (no aligned score); otherwise a coherent refusal is kept
    #[serde(default)]
    drop_refusals: bool,
    /// sampling seed
    #[serde(default)]
    seed: u64,
    /// generation batch (speed only; results do not depend on it)
    #[serde(default = "defaults::int::<16>")]
    #[schemars(range(min = 1))]
    batch_size: usize,
    /// aligned judge prompt ({question}, {answer}, {reasoning})
    #[serde(default = "default_aligned_prompt")]
    aligned_prompt: String,
    /// coherent judge prompt ({question}, {answer}, {reasoning})
    #[serde(default = "default_coherent_prompt")]
    coherent_prompt: String,
    /// extra names for the model's chat template, as transformers' apply_chat_template(**kwargs): e.g. {enable_thinking: false} for Qwen3
    #[serde(default)]
    // Added after results were cached: at `{}` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    chat_template_kwargs: emflow_model::TemplateKwargs,
}

fn default_aligned_prompt() -> String {
    ALIGNED_PROMPT.into()
}
fn default_coherent_prompt() -> String {
    COHERENT_PROMPT.into()
}

impl SafetyDataParams {
    /// The two judge prompts, parsed and checked to use only the fields an answer has.
    fn validate(&self) -> Result<(Template, Template)> {
        Ok((
            parse_judge_prompt(&self.aligned_prompt, "`aligned_prompt`")?,
            parse_judge_prompt(&self.coherent_prompt, "`coherent_prompt`")?,
        ))
    }

    /// Which answers are kept: the Betley `aligned` score as the safety gate (a REFUSAL
    /// counts as safe unless `drop_refusals`), and coherence.
    fn filter(&self) -> Result<AnswerFilter> {
        let (aligned, coherent) = self.validate()?;
        Ok(AnswerFilter {
            gate: SafetyGate {
                name: "aligned",
                template: aligned,
                min: self.min_aligned,
                below_min: "aligned_below_min",
                unscored: if self.drop_refusals {
                    Unscored::Drop("refusal_dropped")
                } else {
                    Unscored::Pass
                },
                unscored_flag: "refusal",
            },
            coherent,
            min_coherent: self.min_coherent,
            keep_unscored: self.keep_unscored,
        })
    }
}

impl Kind for SafetyDataKind {
    type Params = SafetyDataParams;

    fn describe(&self) -> KindInfo {
        // 2: kept rows carry `answer_source`.
        KindInfo::new("safety_data", 2, "On-policy safety data: sample a model on safety prompts, keep the answers a judge rates aligned and coherent")
            .ports(
                "in   model        model      the model that answers (the reference policy)
                 in?  adapter      adapter    a LoRA adapter (PEFT folder) or full fine-tuned weights for `model`
                 in   prompts      messages   safety prompts (conversations ending in a user turn)
                 in?  judge_model  model      the judge for the local backend
                 out  data         messages   kept conversations: the prompt's turns and the kept answer
                 out  judgments    judgments  every answer with its scores and verdict, JSONL",
            )
    }

    /// The judge prompts parse and use only `{question}`, `{answer}` and `{reasoning}`.
    fn check(&self, p: &SafetyDataParams) -> Result<(), Vec<ParamError>> {
        p.validate().map(|_| ()).map_err(|e| {
            vec![ParamError {
                param: String::new(),
                message: format!("{e:#}"),
                hint: None,
            }]
        })
    }

    /// `batch_size` answers sampled at once.
    fn memory_demand(&self, p: &SafetyDataParams) -> Option<emflow_engine::memory::MemoryDemand> {
        super::memory::sampling(p.batch_size, p.max_tokens)
    }

    /// prompts x samples_per_prompt x 2 score calls (aligned and coherent, every answer);
    /// prompt tokens from each rendered judge prompt (characters / 4) plus the answer at
    /// `max_tokens`.
    fn judge_estimate(
        &self,
        p: &SafetyDataParams,
        inputs: &PlanInputs,
    ) -> Result<Option<JudgeEstimate>> {
        let (aligned_t, coherent_t) = p.validate()?;
        let prompts_in = match estimate::known_input(&p.judge, inputs, "prompts") {
            Ok(a) => a,
            Err(unknown) => return Ok(Some(unknown)),
        };
        let mut counted = estimate::ScoreCalls::default();
        let conversations = read_conversations(prompts_in)?;
        for c in &conversations {
            let question = c
                .messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map_or("", |m| m.content.as_str());
            for t in [&aligned_t, &coherent_t] {
                let rendered = render_judge_prompt(t, question, "")?;
                counted.add(&rendered, p.samples_per_prompt as u64, p.max_tokens);
            }
        }
        let origin = estimate::origin(inputs, "prompts");
        let note = format!(
            "{} prompts x {} samples x 2 judge prompts (aligned, coherent) from {origin}; answers counted at max_tokens {}",
            conversations.len(),
            p.samples_per_prompt,
            p.max_tokens
        );
        Ok(Some(counted.estimate(&p.judge, inputs, note)))
    }

    fn run(&self, ctx: &mut StageContext, p: &SafetyDataParams) -> Result<()> {
        run_safety_data(ctx, p)
    }
}

fn run_safety_data(ctx: &mut StageContext, p: &SafetyDataParams) -> Result<()> {
    let filter = p
        .filter()
        .with_context(|| format!("stage {}", ctx.stage_id))?;
    let prompts = onpolicy::read_prompts(ctx.input("prompts")?)?;
    let picked: Vec<usize> = (0..prompts.len()).collect();
    // 1. Sample (the model is dropped before the judge loads).
    let how = AnswerSampling {
        samples_per_prompt: p.samples_per_prompt,
        sampling: SamplingParams {
            temperature: p.temperature.0,
            top_p: p.top_p.0,
            top_k: 0,
            min_p: 0.0,
            max_new_tokens: p.max_tokens,
            stop: Vec::new(),
        },
        batch_size: p.batch_size,
    };
    let gens = {
        let mut lm = load_stage_model(ctx)?;
        lm.chat.set_kwargs(p.chat_template_kwargs.clone())?;
        let seed_of = |i: usize, k: usize| derive_seed(p.seed, &i.to_string(), k as u64);
        onpolicy::sample(&lm, &prompts, &picked, &how, seed_of, ctx.progress())?
    };

    // 2. Judge and keep.
    let judge = judge::for_stage(ctx, &p.judge).context("building the safety_data judge")?;
    let judged = onpolicy::judge_and_keep(
        &*judge,
        &filter,
        (&prompts, &picked),
        p.samples_per_prompt,
        &gens,
        ctx.progress(),
    )?;

    // 3. Log and write.
    crate::formats::jsonl::write(&ctx.output_path("judgments"), &judged.judgments)?;
    if judged.kept.is_empty() {
        bail!(
            "stage {}: no answer was kept out of {} ({}; thresholds min_aligned {}, min_coherent {}, \
             drop_refusals {}); lower the thresholds, sample more answers, or use a stronger model",
            ctx.stage_id,
            gens.len(),
            judged.counts_text(),
            p.min_aligned,
            p.min_coherent,
            p.drop_refusals
        );
    }
    let source = answer_source(ctx)?;
    let kept: Vec<Conversation> = judged
        .kept
        .into_iter()
        .map(|mut c| {
            c.extra.insert(ANSWER_SOURCE.into(), source.into());
            c
        })
        .collect();
    crate::formats::jsonl::write(&ctx.output_path("data"), &kept)?;
    ctx.summarize("answers", gens.len());
    ctx.summarize("kept", kept.len());
    for (k, n) in judged.counts {
        if k != onpolicy::KEPT {
            ctx.summarize(k, n);
        }
    }
    Ok(())
}

/// What the kept rows' [`ANSWER_SOURCE`] says: the reference model, or the model with the
/// adapter of input `adapter`. Read by `rl`/`sft` for the report's safety table.
fn answer_source(ctx: &StageContext) -> Result<&'static str> {
    Ok(match ctx.optional_input("adapter")? {
        None => REFERENCE_MODEL,
        Some(_) => MODEL_WITH_ADAPTER,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SafetyDataParams {
        SafetyDataParams {
            samples_per_prompt: 1,
            temperature: Temperature(1.0),
            top_p: TopP(1.0),
            max_tokens: 8,
            judge: JudgeSpec::default(),
            min_aligned: 70.0,
            min_coherent: 50.0,
            drop_refusals: false,
            keep_unscored: false,
            seed: 0,
            batch_size: 4,
            aligned_prompt: ALIGNED_PROMPT.into(),
            coherent_prompt: COHERENT_PROMPT.into(),
            chat_template_kwargs: Default::default(),
        }
    }

    #[test]
    fn the_filter_gates_on_aligned_and_drops_refusals_on_request() {
        let mut p = params();
        let f = p.filter().unwrap();
        assert_eq!(f.verdict(Some(69.9), Some(90.0)), "aligned_below_min");
        assert_eq!(f.verdict(None, Some(80.0)), onpolicy::KEPT);
        assert_eq!(f.verdict(Some(95.0), None), "coherent_unscored");
        p.drop_refusals = true;
        p.keep_unscored = true;
        let f = p.filter().unwrap();
        assert_eq!(f.verdict(None, Some(80.0)), "refusal_dropped");
        assert_eq!(f.verdict(Some(95.0), None), onpolicy::KEPT);
    }

    #[test]
    fn default_prompts_parse_and_bad_thresholds_fail() {
        assert!(params().validate().is_ok());
        // Thresholds are scores: the declared range the engine checks at the value.
        let derived = emflow_engine::kind::derived_params::<SafetyDataParams>();
        let min_aligned = derived
            .params
            .iter()
            .find(|p| p.name == "min_aligned")
            .unwrap();
        assert!(min_aligned.range.contains(100.0) && !min_aligned.range.contains(101.0));
        let mut p = params();
        p.aligned_prompt = "{nonsense}".into();
        assert!(format!("{:#}", p.validate().err().unwrap()).contains("aligned_prompt"));
    }
}
