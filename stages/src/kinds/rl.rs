//! `rl`: GRPO with TRL's semantics (see [`crate::train::grpo_loss`] for the objective).
//!
//! One RL step: take `prompts_per_step` prompts (seeded order, reshuffled each epoch),
//! sample `num_generations` completions of each with the current policy (row seeds from
//! `derive_seed(seed, prompt index, epoch x G + g)`, so sampling does not depend on batch
//! sizes), score them with the stage's reward, turn rewards into group-relative advantages,
//! and make `num_iterations` optimizer updates on that batch, each over `grad_accum`
//! micro-batches. With `num_iterations = 1` the "old" policy is the current one detached
//! (ratio 1, as in TRL); otherwise the sampling policy's log-probs are computed once before
//! the first update. The reference for `beta > 0` is the base with the adapter off; with
//! `beta = 0` it is never evaluated, unless `log_kl` asks for the KL in the log (so that a
//! beta = 0 arm can be compared with a regularised one).
//!
//! Long runs write a checkpoint (adapter, optimizer, loop counters, logs) every
//! `checkpoint_every` steps and whenever the engine asks the stage to stop; a rerun resumes
//! there and ends with the same bytes as an uninterrupted run. `summary` carries
//! `samples_consumed` (prompts used) for a sample-matched `sft` arm.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use emflow_engine::context::StageContext;
use emflow_engine::kind::{
    estimated_tokens, ArtifactType, JudgeEstimate, Kind, KindInfo, ParamError, PlanInputs, PortSpec,
};
use emflow_model::{
    accumulate, clip_grad_norm, derive_seed, encode_prompt, token_logprobs, AdamW, AdamWConfig,
    Finish, GenerationRequest, LrSchedule, SamplingParams, Schedule,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::defaults;
use crate::judge::{self, estimate, Judge, JudgeSpec, LocalJudgeModel};
use crate::kinds::sft::InterleaveParams;
use crate::reward::{RewardInput, RewardSpec, TemplateInputs};
use crate::train::batch::{collate_rollouts, SftExample};
use crate::train::checkpoint::replace_dir_atomically;
use crate::train::early_stop::RewardTracker;
use crate::train::grpo_loss::{
    compute_advantages, grpo_loss, AdvantageScaling, GrpoLossConfig, ImportanceSampling, LossType,
    MicroBatch, StepShape,
};
use crate::train::metrics_log::JsonlLog;
use crate::train::policy::{load_policy, LoraParams, Policy};
use crate::train::run::{read_conversations, resume, save_checkpoint, to_model_messages, Cursor};
use crate::train::sft_step::{ldifs_distance, sft_step, LdifsParams, SftStepConfig};

pub struct RlKind;

/// Stop on a reward plateau: the mean reward of the last `window` steps gained less than
/// `min_gain` over the window before.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopParams {
    /// Steps per window; `null` = half an epoch.
    #[serde(default)]
    pub window: Option<usize>,
    /// Smallest gain of the mean reward between windows that keeps the run going.
    #[serde(default = "defaults::ratio::<5, 100>")]
    pub min_gain: f64,
}

/// The `rl` kind's params: the one declaration of their names, types, defaults, ranges and
/// docs (the engine derives the kind's spec from this struct).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RlParams {
    /// reward spec: {type: keyword|regex|length_band|grader|sum, ...}
    // A tagged union checked when the kind's `check` deserialises it: to the manifest it is
    // a mapping.
    #[schemars(with = "serde_json::Map<String, Value>")]
    pub reward: RewardSpec,
    /// LoRA for a fresh adapter (ignored when input `adapter` is wired)
    #[serde(default)]
    // `{}`, not the expanded settings: the default every existing key was made with.
    #[schemars(extend("default" = {}))]
    pub lora: LoraParams,
    /// train every weight instead of LoRA
    #[serde(default)]
    pub full_finetune: bool,
    /// prompts per RL step
    #[serde(default = "defaults::int::<4>")]
    #[schemars(range(min = 1))]
    pub prompts_per_step: usize,
    /// completions per prompt (G); at least 2: advantages compare completions of one prompt
    #[serde(default = "defaults::int::<4>")]
    #[schemars(range(min = 2))]
    pub num_generations: usize,
    /// sampling temperature (also applied to training log-probs, as TRL does); GRPO samples, so > 0
    #[serde(default = "defaults::ratio::<8, 10>")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub temperature: f64,
    /// nucleus sampling
    #[serde(default = "defaults::ratio::<9, 10>")]
    pub top_p: f64,
    /// top-k sampling (0 = off)
    #[serde(default)]
    pub top_k: usize,
    /// min-p sampling (0 = off)
    #[serde(default)]
    pub min_p: f64,
    /// prompt tokens kept (the end of longer prompts)
    #[serde(default = "defaults::int::<756>")]
    #[schemars(range(min = 1))]
    pub max_prompt_length: usize,
    /// tokens generated at most
    #[serde(default = "defaults::int::<2300>")]
    #[schemars(range(min = 1))]
    pub max_completion_length: usize,
    /// advantage scaling
    #[serde(default = "AdvantageScaling::default")]
    pub scale_rewards: AdvantageScaling,
    /// loss aggregation (TRL's loss_type)
    #[serde(default = "LossType::default")]
    pub loss_type: LossType,
    /// importance ratio per token or per sequence (GSPO)
    #[serde(default = "ImportanceSampling::default")]
    pub importance_sampling_level: ImportanceSampling,
    /// clip epsilon (low side)
    #[serde(default = "defaults::ratio::<2, 10>")]
    #[schemars(range(min = 0.0))]
    pub epsilon: f64,
    /// clip epsilon (high side); null = epsilon
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub epsilon_high: Option<f64>,
    /// k3 KL weight toward the reference (adapter off); 0 = no reference pass
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub beta: f64,
    /// log the k3 KL to the reference even at beta = 0 (one more forward pass per step; the loss is unchanged)
    #[serde(default)]
    pub log_kl: bool,
    /// optimizer updates per batch of rollouts
    #[serde(default = "defaults::int::<1>")]
    #[schemars(range(min = 1))]
    pub num_iterations: usize,
    /// micro-batches per update; must divide prompts_per_step x num_generations (matters for bnpo)
    #[serde(default = "defaults::int::<4>")]
    #[schemars(range(min = 1))]
    pub grad_accum: usize,
    /// peak learning rate
    #[serde(default = "defaults::ratio::<5, 1_000_000>")]
    pub lr: f64,
    /// learning-rate decay
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// share of updates spent warming up
    #[serde(default = "defaults::ratio::<1, 10>")]
    pub warmup_ratio: f64,
    /// AdamW weight decay
    #[serde(default = "defaults::ratio::<1, 10>")]
    pub weight_decay: f64,
    /// global gradient-norm clip
    #[serde(default = "defaults::ratio::<1, 1>")]
    pub max_grad_norm: f64,
    /// passes over the prompts (unless max_steps)
    #[serde(default = "defaults::uint::<1>")]
    #[schemars(range(min = 1))]
    pub epochs: u64,
    /// RL steps to run (overrides epochs)
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_steps: Option<u64>,
    /// seed for LoRA init, prompt order and sampling
    #[serde(default = "defaults::uint::<3407>")]
    pub seed: u64,
    /// system turn for every rollout (overridden by input `system_prompt`)
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// stop on a reward plateau: {window: steps (null = half an epoch), min_gain: 0.05}
    #[serde(default)]
    pub early_stop: Option<EarlyStopParams>,
    /// steps averaged when picking the best-reward adapter
    #[serde(default = "defaults::int::<5>")]
    pub best_smoothing: usize,
    /// SFT steps on input `safety`: {every: k | share: s, batch_size: 4}
    #[serde(default)]
    pub interleave: Option<InterleaveParams>,
    /// RL steps between resumable checkpoints
    #[serde(default = "defaults::uint::<10>")]
    #[schemars(range(min = 1))]
    pub checkpoint_every: u64,
    /// judge for grader rewards: {backend: local} (model from input `judge_model`) or {backend: openai, base_url, model, api_key_env}
    #[serde(default)]
    // A tagged union, a mapping to the manifest; `{backend: local}` is the default every
    // existing key was made with (not the expanded local settings).
    #[schemars(with = "serde_json::Map<String, Value>", extend("default" = {"backend": "local"}))]
    pub judge: JudgeSpec,
    /// system prompt put before every rollout's system turn, in training only (null = off)
    #[serde(default)]
    pub inoculation: Option<String>,
    /// LDIFS regulariser {lambda, every: 5}: feature distance to the reference at every k-th layer
    #[serde(default)]
    pub ldifs: Option<LdifsParams>,
}

fn default_schedule() -> Schedule {
    Schedule::Cosine
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RlState {
    steps: u64,
    updates: u64,
    prompts_consumed: u64,
    safety_steps: u64,
    safety_consumed: u64,
    tracker: RewardTracker,
    stopped_early: Option<String>,
}

impl RlParams {
    /// What the declared ranges cannot say: combinations of params.
    fn validate(&self) -> Result<()> {
        let rows = self.prompts_per_step * self.num_generations;
        ensure!(
            self.grad_accum >= 1 && rows.is_multiple_of(self.grad_accum),
            "grad_accum ({}) must divide prompts_per_step x num_generations ({rows})",
            self.grad_accum
        );
        ensure!(
            !(self.full_finetune && self.beta > 0.0),
            "beta > 0 needs LoRA: the reference is the base with the adapter off"
        );
        ensure!(
            !(self.full_finetune && self.log_kl),
            "log_kl needs LoRA: the reference is the base with the adapter off"
        );
        if let Some(l) = &self.ldifs {
            ensure!(
                l.lambda >= 0.0 && l.lambda.is_finite(),
                "ldifs.lambda must be a non-negative number"
            );
            ensure!(l.every >= 1, "ldifs.every must be at least 1");
            ensure!(
                !self.full_finetune,
                "ldifs needs LoRA: the reference is the base with the adapter off"
            );
        }
        if let Some(text) = &self.inoculation {
            ensure!(
                !text.trim().is_empty(),
                "inoculation is an empty prompt; write the prompt or set it to null"
            );
        }
        if let Some(i) = &self.interleave {
            i.cadence()?;
        }
        Ok(())
    }
}

impl Kind for RlKind {
    type Params = RlParams;

    fn describe(&self) -> KindInfo {
        KindInfo::new("rl", 3, "GRPO (TRL semantics) with a rule-based or LLM-graded reward, KL to the reference, safety interleaving")
            .inputs(vec![
                PortSpec::input("model", ArtifactType::Model, "base model"),
                PortSpec::optional_input("adapter", ArtifactType::Adapter, "adapter to continue (e.g. the SFT warm-up)"),
                PortSpec::input("prompts", ArtifactType::Messages, "prompt conversations (the last turn is the user's)"),
                PortSpec::optional_input("system_prompt", ArtifactType::File, "text file whose content is the rollout system prompt"),
                PortSpec::optional_input("safety", ArtifactType::Messages, "safety conversations for interleaved SFT steps"),
                PortSpec::optional_input("grader", ArtifactType::File, "grader prompt template, for `reward: {type: grader, template: {input: grader}}`"),
                PortSpec::optional_input("judge_model", ArtifactType::Model, "the grader's model for the local judge backend"),
            ])
            .outputs(vec![
                PortSpec::output("adapter", ArtifactType::Adapter, "final adapter"),
                PortSpec::output("best_adapter", ArtifactType::Adapter, "adapter at the best smoothed mean reward"),
                PortSpec::output("rollouts", ArtifactType::Samples, "every completion with its reward, parts and advantage"),
                PortSpec::output("metrics", ArtifactType::Metrics, "one JSON object per step"),
                PortSpec::output("summary", ArtifactType::Summary, "samples_consumed, steps, best step, early stop"),
            ])
    }

    fn check(&self, p: &RlParams) -> Result<(), Vec<ParamError>> {
        let err = |param: &str, e: anyhow::Error| {
            vec![ParamError {
                param: param.into(),
                message: format!("{e:#}"),
                hint: None,
            }]
        };
        p.validate().map_err(|e| err("", e))?;
        p.reward
            .prepare(TemplateInputs::Deferred)
            .map_err(|e| err("reward", e))?;
        Ok(())
    }

    /// Grader rewards: steps x prompts_per_step x num_generations calls per grader, an upper
    /// bound when the pre-filter or early stopping can make fewer; prompt tokens from the
    /// template and the mean prompt (characters / 4) plus the rollout at
    /// `max_completion_length`; completion tokens at the grader's `max_tokens`.
    fn judge_estimate(&self, p: &RlParams, inputs: &PlanInputs) -> Result<Option<JudgeEstimate>> {
        let graders = p.reward.graders();
        if graders.is_empty() {
            return Ok(None);
        }
        let (judge_model, local) = estimate::judge_name(&p.judge, inputs, "judge_model");
        let read_port = |port: &str| -> Result<String> {
            let a = inputs
                .known(port)
                .map_err(|why| anyhow::anyhow!("input `{port}`: {why}"))?;
            std::fs::read_to_string(&a.path).with_context(|| format!("reading {}", a.origin))
        };
        let numbers = graders
            .iter()
            .map(|g| g.numbers(TemplateInputs::Read(&read_port)))
            .collect::<Result<Vec<_>>>()
            .context("reading the grader template")?;
        let prompts = match inputs.known("prompts") {
            Ok(a) => Some(read_conversations(a)?),
            Err(why) if p.max_steps.is_none() => {
                return Ok(Some(JudgeEstimate::unknown(
                    judge_model,
                    local,
                    format!("prompts {why} (the step count follows from them; or set max_steps)"),
                )))
            }
            Err(_) => None,
        };
        let pps = p.prompts_per_step as u64;
        let (steps, steps_from) = match (p.max_steps, &prompts) {
            (Some(s), _) => (s, "max_steps".to_string()),
            (None, Some(ps)) => (
                (p.epochs * ps.len() as u64).div_ceil(pps),
                format!(
                    "{} epochs of {} prompts from {}",
                    p.epochs,
                    ps.len(),
                    inputs
                        .first("prompts")
                        .map(estimate::described)
                        .unwrap_or_default()
                ),
            ),
            (None, None) => bail!("no step count: neither max_steps nor prompts are known"),
        };
        let rollouts = steps * pps * p.num_generations as u64;
        let mean_prompt_chars = match &prompts {
            Some(ps) if !ps.is_empty() => {
                let total: usize = ps
                    .iter()
                    .map(|c| {
                        c.messages
                            .iter()
                            .rev()
                            .find(|m| m.role == "user")
                            .map_or(0, |m| m.content.chars().count())
                    })
                    .sum();
                total / ps.len()
            }
            _ => 0,
        };
        let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
        for n in &numbers {
            prompt_tokens += rollouts
                * (estimated_tokens(n.template_chars + mean_prompt_chars)
                    + p.max_completion_length as u64);
            completion_tokens += rollouts * n.max_tokens as u64;
        }
        let mut notes = vec![format!(
            "{steps} steps ({steps_from}) x {} prompts x {} generations x {} grader(s); rollouts counted at max_completion_length {}",
            p.prompts_per_step,
            p.num_generations,
            numbers.len(),
            p.max_completion_length
        )];
        if prompts.is_none() {
            notes.push("prompt lengths not known before the prompts exist: not counted".into());
        }
        let may_skip = numbers.iter().any(|n| n.may_skip);
        let mut fewer = Vec::new();
        if may_skip {
            fewer.push("answers under the grader's word minimums get 0 without a call");
        }
        if p.early_stop.is_some() {
            fewer.push("early_stop can end the run sooner");
        }
        if !fewer.is_empty() {
            notes.push(format!("upper bound: {}", fewer.join("; ")));
        }
        Ok(Some(JudgeEstimate {
            judge_model,
            local,
            calls: Some(rollouts * numbers.len() as u64),
            upper_bound: !fewer.is_empty(),
            prompt_tokens,
            completion_tokens,
            notes,
        }))
    }

    fn run(&self, ctx: &mut StageContext, p: &RlParams) -> Result<()> {
        p.validate()
            .with_context(|| format!("stage {}", ctx.stage_id))?;
        run_rl(ctx, p)
    }
}

/// Time split of one step, in seconds.
#[derive(Default)]
struct Timing {
    sampling: f64,
    reward: f64,
    training: f64,
}

fn to_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Per-token log-probs of the completions without a graph (old or reference policy).
fn logps_no_grad(
    policy: &Policy,
    rows: &[(&[u32], &[u32])],
    micro: usize,
    temperature: f64,
) -> Result<Vec<Tensor>> {
    let pad = policy.lm.tokenizer.pad_id();
    let device = policy.lm.model.device().clone();
    rows.chunks(micro)
        .map(|chunk| {
            let b = collate_rollouts(chunk, pad, &device)?;
            let logits = policy.lm.model.forward_eval(&b.ids, &b.attention)?;
            Ok(
                token_logprobs(&b.completion_logits(&logits)?, &b.completion, temperature)?
                    .detach(),
            )
        })
        .collect()
}

/// The rollout system turn under an inoculation prompt: the prompt, then the stage's own
/// system prompt (if any) after a blank line.
fn with_inoculation(inoculation: Option<&str>, system: Option<String>) -> Option<String> {
    match (inoculation, system) {
        (None, s) => s,
        (Some(i), None) => Some(i.to_string()),
        (Some(i), Some(s)) => Some(format!("{i}\n\n{s}")),
    }
}

/// The judge for grader rewards, built once per stage (memoised through the store).
///
/// A local judge loads its own copy of `judge_model`, even when it is the policy's base
/// model: the model layer's `Transformer` cannot yet share its frozen weights with a second
/// owner (see the report on issue 4).
fn build_judge(ctx: &StageContext, spec: &JudgeSpec) -> Result<Arc<dyn Judge>> {
    let cuda = ctx.device().cuda_ordinal();
    let judge_model = ctx.optional_input("judge_model")?.cloned();
    let local = judge_model.as_ref().map(|m| LocalJudgeModel {
        model: &m.path,
        model_digest: &m.digest,
        adapter: None,
        cuda_ordinal: cuda,
    });
    judge::build(spec, local, ctx.memo_handle())
        .with_context(|| format!("stage {}: building the grader's judge", ctx.stage_id))
}

pub(crate) fn run_rl(ctx: &mut StageContext, p: &RlParams) -> Result<()> {
    let progress = ctx.progress_handle();
    progress.phase("loading", 0, "");
    let reward = {
        let read_port = |port: &str| -> Result<String> {
            let f = ctx.optional_input(port)?.with_context(|| {
                format!(
                    "the reward's template names input `{port}`, but the stage does not wire it"
                )
            })?;
            std::fs::read_to_string(&f.path).with_context(|| format!("reading {}", f.origin))
        };
        p.reward
            .prepare(TemplateInputs::Read(&read_port))
            .with_context(|| format!("stage {}: preparing the reward", ctx.stage_id))?
    };
    let mut policy = load_policy(ctx, &p.lora, p.full_finetune, p.seed)?;
    let judge = if reward.needs_judge() {
        Some(build_judge(ctx, &p.judge)?)
    } else {
        None
    };
    let system = match ctx.optional_input("system_prompt")? {
        Some(f) => Some(
            std::fs::read_to_string(&f.path)
                .with_context(|| format!("reading {}", f.origin))?
                .trim_end()
                .to_string(),
        ),
        None => p.system_prompt.clone(),
    };
    let system = with_inoculation(p.inoculation.as_deref(), system);
    let prompts = read_conversations(ctx.input("prompts")?)?;
    let mut prompt_ids = Vec::with_capacity(prompts.len());
    let mut prompt_msgs = Vec::with_capacity(prompts.len());
    for (i, c) in prompts.iter().enumerate() {
        let mut msgs = to_model_messages(c, system.as_deref());
        if msgs.last().is_some_and(|m| m.role == "assistant") {
            msgs.pop();
        }
        ensure!(
            msgs.last().is_some_and(|m| m.role == "user"),
            "prompt {i} does not end with a user turn"
        );
        let mut ids = encode_prompt(&policy.lm.tokenizer, &policy.lm.chat, &msgs)?;
        if ids.len() > p.max_prompt_length {
            ids.drain(..ids.len() - p.max_prompt_length);
        }
        prompt_ids.push(ids);
        prompt_msgs.push(msgs);
    }
    let safety = match (&p.interleave, ctx.optional_input("safety")?) {
        (Some(i), Some(input)) => {
            let mut ex = Vec::new();
            for c in read_conversations(input)? {
                let enc = emflow_model::encode_chat(
                    &policy.lm.tokenizer,
                    &policy.lm.chat,
                    &to_model_messages(&c, None),
                )?;
                ex.push(SftExample {
                    ids: enc.ids,
                    target: enc.assistant_mask,
                });
            }
            Some((i.cadence()?, i.batch_size, ex))
        }
        (None, None) => None,
        (Some(_), None) => bail!(
            "stage {}: `interleave` is set but input `safety` is not wired",
            ctx.stage_id
        ),
        (None, Some(_)) => bail!(
            "stage {}: input `safety` is wired but `interleave` is not set",
            ctx.stage_id
        ),
    };

    let total_steps = match p.max_steps {
        Some(s) => s,
        None => (p.epochs * prompts.len() as u64).div_ceil(p.prompts_per_step as u64),
    };
    ensure!(
        total_steps > 0,
        "stage {}: nothing to train (0 steps)",
        ctx.stage_id
    );
    let total_updates = total_steps as usize * p.num_iterations;
    let schedule = LrSchedule {
        base_lr: p.lr,
        kind: p.schedule,
        warmup_steps: (p.warmup_ratio * total_updates as f64).ceil() as usize,
        total_steps: total_updates,
    };
    let mut opt = AdamW::new(
        policy.vars.clone(),
        AdamWConfig {
            lr: p.lr,
            weight_decay: p.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    opt.set_weight_decay_filter(emflow_model::optim::transformers_decays);
    let loss_cfg = GrpoLossConfig {
        loss_type: p.loss_type,
        importance_sampling: p.importance_sampling_level,
        epsilon_low: p.epsilon,
        epsilon_high: p.epsilon_high.unwrap_or(p.epsilon),
        beta: p.beta,
        max_completion_length: p.max_completion_length,
    };
    let sampling = SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        min_p: p.min_p,
        max_new_tokens: p.max_completion_length,
        stop: Vec::new(),
    };
    let safety_cfg = SftStepConfig {
        micro_batch: p.interleave.as_ref().map_or(1, |i| i.batch_size),
        kl_lambda: 0.0,
        ldifs: None,
        max_grad_norm: p.max_grad_norm,
    };
    let early_window = p.early_stop.as_ref().map(|e| {
        e.window
            .unwrap_or_else(|| prompts.len().div_ceil(2 * p.prompts_per_step).max(1))
    });

    let ckpt_root = ctx.checkpoint_dir().join("rl");
    let best_dir = ctx.checkpoint_dir().join("rl-best");
    let resumed = resume::<RlState>(&ckpt_root, &mut policy, &mut opt)?;
    let (mut state, mut metrics, mut rollouts) = match &resumed {
        Some(r) => {
            progress.log(&format!(
                "resuming from checkpoint after RL step {}",
                r.state.steps
            ));
            (
                r.state.clone(),
                JsonlLog::open(&ctx.output_path("metrics"), r.log("metrics").as_deref())?,
                JsonlLog::open(&ctx.output_path("rollouts"), r.log("rollouts").as_deref())?,
            )
        }
        None => (
            RlState::default(),
            JsonlLog::open(&ctx.output_path("metrics"), None)?,
            JsonlLog::open(&ctx.output_path("rollouts"), None)?,
        ),
    };
    let mut cursor = Cursor::new(prompts.len(), p.seed, "prompts", state.prompts_consumed);
    let mut safety_cursor = safety
        .as_ref()
        .map(|(_, _, ex)| Cursor::new(ex.len(), p.seed, "safety", state.safety_consumed));
    let g = p.num_generations;
    let rows_per_step = p.prompts_per_step * g;
    let micro = rows_per_step / p.grad_accum;
    let pad = policy.lm.tokenizer.pad_id();
    let device = policy.lm.model.device().clone();

    progress.phase("rl", total_steps, "steps");
    progress.inc(state.steps);
    while state.steps < total_steps && state.stopped_early.is_none() {
        let mut timing = Timing::default();
        let step_started = Instant::now();
        // 1. Sample.
        let picked = cursor.take(p.prompts_per_step);
        let mut reqs = Vec::with_capacity(rows_per_step);
        for (idx, epoch) in &picked {
            for k in 0..g {
                reqs.push(GenerationRequest {
                    prompt_ids: prompt_ids[*idx].clone(),
                    seed: derive_seed(p.seed, &idx.to_string(), epoch * g as u64 + k as u64),
                });
            }
        }
        let t0 = Instant::now();
        let gens = policy.lm.model.generate(
            &policy.lm.tokenizer,
            &reqs,
            &sampling,
            rows_per_step,
            &|_| {},
        )?;
        timing.sampling = t0.elapsed().as_secs_f64();
        // 2. Reward.
        let t0 = Instant::now();
        let inputs: Vec<RewardInput> = picked
            .iter()
            .flat_map(|(idx, _)| std::iter::repeat_n(*idx, g))
            .zip(&gens)
            .map(|(idx, gen)| RewardInput {
                prompt: prompt_msgs[idx]
                    .last()
                    .map(|m| m.content.clone())
                    .unwrap_or_default(),
                completion: gen.text.clone(),
            })
            .collect();
        let scored = reward
            .score_batch(&inputs, judge.as_deref())
            .with_context(|| format!("stage {}: scoring step {}", ctx.stage_id, state.steps))?;
        timing.reward = t0.elapsed().as_secs_f64();
        let rewards: Vec<f64> = scored.iter().map(|r| r.total).collect();
        let adv = compute_advantages(&rewards, g, p.scale_rewards)?;

        // 3. Train.
        let t0 = Instant::now();
        let rows: Vec<(&[u32], &[u32])> = reqs
            .iter()
            .zip(&gens)
            .map(|(r, gen)| (r.prompt_ids.as_slice(), gen.tokens.as_slice()))
            .collect();
        let step_tokens: usize = gens.iter().map(|gen| gen.tokens.len()).sum();
        let old = if p.num_iterations > 1 {
            Some(logps_no_grad(&policy, &rows, micro, p.temperature)?)
        } else {
            None
        };
        let reference = if p.beta != 0.0 || p.log_kl {
            policy.lm.model.set_lora_enabled(false);
            let r = logps_no_grad(&policy, &rows, micro, p.temperature);
            policy.lm.model.set_lora_enabled(true);
            Some(r?)
        } else {
            None
        };
        let (
            mut loss_sum,
            mut kl_sum,
            mut clip_sum,
            mut clip_low,
            mut clip_high,
            mut ent_sum,
            mut grad_norm,
        ) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        let n_micro = (p.grad_accum * p.num_iterations) as f64;
        let ldifs_layers = match &p.ldifs {
            Some(l) if l.lambda != 0.0 => l.layers(policy.lm.config.num_layers),
            _ => Vec::new(),
        };
        let ldifs_lambda = p.ldifs.as_ref().map_or(0.0, |l| l.lambda);
        let mut ldifs_sum = 0.0;
        let mut lr = 0.0;
        for _ in 0..p.num_iterations {
            let mut grads = None;
            for (m, chunk) in rows.chunks(micro).enumerate() {
                let b = collate_rollouts(chunk, pad, &device)?;
                // LDIFS reference features: adapter off, frozen weights only, so no graph.
                let ref_hidden = if ldifs_layers.is_empty() {
                    Vec::new()
                } else {
                    policy.lm.model.set_lora_enabled(false);
                    let out =
                        policy
                            .lm
                            .model
                            .forward_train_hidden(&b.ids, &b.attention, &ldifs_layers);
                    policy.lm.model.set_lora_enabled(true);
                    out.context("LDIFS reference forward pass")?
                        .1
                        .into_iter()
                        .map(|h| h.detach())
                        .collect()
                };
                // Scored only where they predict completion tokens (the prompt's positions
                // would be projected to the vocabulary and thrown away).
                let scores = policy.lm.model.forward_train_scores(
                    &b.ids,
                    &b.attention,
                    &ldifs_layers,
                    (b.first_predicting_position(), b.completion_len),
                    &b.completion,
                    p.temperature,
                )?;
                let (logps, hidden) = (scores.logprobs, scores.hidden);
                let adv_t = Tensor::from_vec(
                    adv.values[m * micro..(m + 1) * micro]
                        .iter()
                        .map(|a| *a as f32)
                        .collect::<Vec<_>>(),
                    micro,
                    &device,
                )?;
                let mb = MicroBatch {
                    policy_logps: &logps,
                    old_logps: old.as_ref().map(|o| &o[m]),
                    ref_logps: reference.as_ref().map(|r| &r[m]),
                    mask: &b.completion_mask,
                    advantages: &adv_t,
                };
                let out = grpo_loss(
                    &loss_cfg,
                    &mb,
                    StepShape {
                        grad_accum_steps: p.grad_accum,
                        step_tokens: step_tokens as f64,
                    },
                )?;
                let mut loss = out.loss.clone();
                if let Some(dist) = ldifs_distance(
                    &hidden,
                    &ref_hidden,
                    &b.attention,
                    policy.lm.config.hidden_size,
                )? {
                    // Each micro-batch is 1/grad_accum of the step, as in the policy loss.
                    ldifs_sum += to_f64(&dist)?;
                    loss = (loss + (dist * (ldifs_lambda / p.grad_accum as f64))?)?;
                }
                // Entropy of the (temperature-scaled) next-token distribution, for the log.
                ent_sum += to_f64(&(scores.entropy * &b.completion_mask)?.sum_all()?)?;
                loss_sum += to_f64(&loss)?;
                kl_sum += out.stats.kl.unwrap_or(0.0);
                clip_sum += out.stats.clip_region;
                clip_low += out.stats.clip_low;
                clip_high += out.stats.clip_high;
                let g = loss.backward()?;
                accumulate(&mut grads, &policy.vars, g, 1.0)?;
            }
            let mut grads = grads.context("no gradients were produced")?;
            grad_norm = clip_grad_norm(&policy.vars, &mut grads, p.max_grad_norm)?;
            lr = schedule.lr_at(state.updates as usize);
            opt.step(&grads, lr)?;
            state.updates += 1;
        }
        timing.training = t0.elapsed().as_secs_f64();
        state.steps += 1;
        state.prompts_consumed = cursor.consumed;

        // 4. Log.
        let step = state.steps - 1;
        for (i, ((gen, out), a)) in gens.iter().zip(&scored).zip(&adv.values).enumerate() {
            let (idx, epoch) = picked[i / g];
            rollouts.append(&json!({
                "step": step, "prompt_index": idx, "epoch": epoch, "generation": i % g,
                "prompt": prompt_msgs[idx], "completion": gen.text, "reward": out.total, "parts": out.parts,
                "details": out.details, "advantage": a, "completion_tokens": gen.tokens.len(),
                "finish": format!("{:?}", gen.finish).to_lowercase(),
            }))?;
        }
        let n = rewards.len() as f64;
        let mean_reward = rewards.iter().sum::<f64>() / n;
        let reward_std = adv.group_std.iter().sum::<f64>() / adv.group_std.len().max(1) as f64;
        let mut parts = serde_json::Map::new();
        for name in scored
            .first()
            .map(|s| s.parts.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let m = scored
                .iter()
                .map(|s| s.parts.get(&name).copied().unwrap_or(0.0))
                .sum::<f64>()
                / n;
            parts.insert(name, json!(m));
        }
        let lengths: Vec<usize> = gens.iter().map(|gen| gen.tokens.len()).collect();
        let truncated = gens
            .iter()
            .filter(|gen| matches!(gen.finish, Finish::Length))
            .count() as f64
            / n;
        let elapsed = step_started.elapsed().as_secs_f64();
        metrics.append(&json!({
            "step": step, "batch": "rl", "reward": mean_reward, "reward_std": reward_std, "rewards": parts,
            "frac_reward_zero_std": adv.frac_zero_std, "loss": loss_sum / p.num_iterations as f64,
            "kl": reference.as_ref().map(|_| kl_sum / n_micro),
            "ldifs": if ldifs_layers.is_empty() { None } else { Some(ldifs_sum / n_micro) },
            "clip_ratio": clip_sum / n_micro, "clip_ratio_low": clip_low / n_micro, "clip_ratio_high": clip_high / n_micro,
            "entropy": ent_sum / step_tokens.max(1) as f64, "grad_norm": grad_norm, "lr": lr,
            "completion_length_mean": step_tokens as f64 / n, "completion_length_min": lengths.iter().min(),
            "completion_length_max": lengths.iter().max(), "completions_clipped_ratio": truncated,
            "samples_consumed": state.prompts_consumed,
        }))?;
        // Timings go to the log, never into an output: outputs must be the same bytes on every
        // run (`emflow verify`), and wall-clock figures are not.
        progress.log(&format!(
            "step {step}: {elapsed:.1}s (sampling {:.1}s at {:.0} tok/s, reward {:.1}s, training {:.1}s)",
            timing.sampling,
            step_tokens as f64 / timing.sampling.max(1e-9),
            timing.reward,
            timing.training
        ));
        progress.message(&format!("reward {mean_reward:.3}"));
        progress.inc(1);

        if state.tracker.record(step, mean_reward, p.best_smoothing) {
            let tmp = ctx.checkpoint_dir().join("rl-best-new");
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)?;
            }
            policy.save(&tmp)?;
            replace_dir_atomically(&tmp, &best_dir)?;
            std::fs::remove_dir_all(&tmp)?;
        }

        // 5. Interleaved safety SFT steps.
        if let (Some((cadence, bs, ex)), Some(cur)) = (&safety, safety_cursor.as_mut()) {
            for _ in 0..cadence.steps_after(state.steps) {
                let batch: Vec<SftExample> = cur
                    .take(*bs)
                    .into_iter()
                    .map(|(i, _)| ex[i].clone())
                    .collect();
                let lr = schedule.lr_at(state.updates.saturating_sub(1) as usize);
                let s = sft_step(&mut policy, &batch, &safety_cfg, &mut opt, lr)?;
                state.safety_steps += 1;
                state.safety_consumed = cur.consumed;
                metrics.append(&json!({
                    "step": step, "batch": "safety", "loss": s.loss, "nll": s.nll, "lr": lr, "grad_norm": s.grad_norm,
                    "tokens": s.tokens, "safety_consumed": cur.consumed,
                }))?;
            }
        }

        if let (Some(window), Some(es)) = (early_window, &p.early_stop) {
            if let Some(gain) = state.tracker.plateaued(window, es.min_gain) {
                let why = format!(
                    "mean reward gained {gain:.4} < {} over the last {window} steps",
                    es.min_gain
                );
                progress.log(&format!("early stop after step {step}: {why}"));
                state.stopped_early = Some(why);
            }
        }
        let finished = state.steps >= total_steps || state.stopped_early.is_some();
        if !finished && (state.steps % p.checkpoint_every == 0 || ctx.interrupt_requested()) {
            save_checkpoint(
                &ckpt_root,
                &policy,
                &opt,
                &state,
                &[&metrics, &rollouts],
                |_| Ok(()),
            )?;
            ctx.check_interrupt()?;
        }
    }

    policy.save(&ctx.output_path("adapter"))?;
    crate::train::checkpoint::copy_dir(&best_dir, &ctx.output_path("best_adapter"))
        .context("copying the best-reward adapter")?;
    let (best_step, best_reward) = state.tracker.best().unwrap_or((0, f64::NAN));
    let summary = json!({
        "samples_consumed": state.prompts_consumed,
        "completions": state.prompts_consumed * g as u64,
        "steps": state.steps,
        "updates": state.updates,
        "safety_steps": state.safety_steps,
        "best_step": best_step,
        "best_reward": best_reward,
        "stopped_early": state.stopped_early,
    });
    super::write_summary(ctx, summary)?;
    Ok(())
}
