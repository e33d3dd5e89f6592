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
//! `samples_consumed` (prompts used) for a sample-matched `sft` arm. `snapshot_fractions`
//! saves the adapter at set fractions of the run into output `snapshots` (see
//! [`crate::train::snapshots`]), which an `eval` stage turns into EM over training.
//!
//! Safety interleaving (`interleave`) takes SFT steps on safety conversations between the RL
//! steps. `safety_source` says where they come from: `precomputed` (input `safety`, e.g. the
//! reference model's judged answers from `safety_data`) or `current_policy` (regenerated
//! from the policy being trained every `regenerate.every` steps, [`crate::train::regenerate`]).

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use emflow_engine::context::StageContext;
use emflow_engine::kind::{
    estimated_tokens, JudgeEstimate, Kind, KindInfo, ParamError, PlanInputs,
};
use emflow_engine::memory::MemoryDemand;
use emflow_model::{encode_prompt, AdamW, LrSchedule, SamplingParams, Schedule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::defaults;
use crate::formats::messages::{read_conversations, to_model_messages, Conversation};
use crate::judge::prompts::parse_judge_prompt;
use crate::judge::{self, estimate, JudgeSpec};
use crate::onpolicy;
use crate::reward::{Prefilter, Reward, RewardSpec, TemplateInputs};
use crate::train::checkpoint::replace_dir_atomically;
use crate::train::early_stop::{EarlyStopRule, EmaRlSchedule, RewardTracker};
use crate::train::grpo_loss::{AdvantageScaling, GrpoLossConfig, ImportanceSampling, LossType};
use crate::train::grpo_step::{grpo_step, EncodedPrompts, GrpoConfig, StepOutcome, StepSources};
use crate::train::interleave::Interleave;
use crate::train::interleave::{interleave_setting, InterleaveParams};
use crate::train::metrics_log::JsonlLog;
use crate::train::policy::{LoraParams, Policy};
use crate::train::regenerate::{self, RegenState, RegenerateParams, Regenerator, SafetySource};
use crate::train::regularise::Ldifs;
use crate::train::resume::{resume_with_logs, save_checkpoint, Cursor};
use crate::train::setup::{load_policy, optimizer};
use crate::train::sft_step::{sft_step, LdifsParams, SftStepConfig};
use crate::train::snapshots::{check_fractions, Snapshots};
use crate::train::throughput::Throughput;

pub struct RlKind;

/// Stop on a reward plateau: the mean reward of the last `window` steps gained less than
/// `min_gain` over the window before (`rule: rolling`), or EMA_RL's check at epochs 0.5,
/// 1.5, ... (`rule: ema_rl`; see [`crate::train::early_stop`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopParams {
    /// `rolling` (checked every step) or `ema_rl` (the paper's code: at epochs 0.5, 1.5, ...)
    // Absent from manifests written before it: an unwritten rule keys as before.
    #[serde(default)]
    pub rule: EarlyStopRule,
    /// Steps per window (`rolling`); `null` = half an epoch.
    pub window: Option<usize>,
    /// Smallest gain of the mean reward between windows that keeps the run going.
    #[serde(default = "defaults::ratio::<5, 100>")]
    pub min_gain: f64,
    /// Check points per epoch (`ema_rl`; EMA_RL's `evaluate_epoch`): at e + k/(n+1)
    #[serde(default = "defaults::int::<1>")]
    #[schemars(range(min = 1))]
    pub checks_per_epoch: usize,
    /// Steps between the trainer's logging steps, where `ema_rl` checks (EMA_RL's `logging_steps`)
    #[serde(default = "defaults::uint::<5>")]
    #[schemars(range(min = 1))]
    pub log_every: u64,
}

impl EarlyStopParams {
    /// What the types cannot say: each rule's own settings.
    fn validate(&self) -> Result<()> {
        ensure!(
            !(self.rule == EarlyStopRule::EmaRl && self.window.is_some()),
            "early_stop.window is the rolling rule's; `rule: ema_rl` checks at fixed epochs (set checks_per_epoch instead)"
        );
        ensure!(
            self.checks_per_epoch >= 1 && self.log_every >= 1,
            "early_stop.checks_per_epoch and early_stop.log_every must be at least 1"
        );
        Ok(())
    }
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
    #[schemars(range(min = 1))]
    pub max_steps: Option<u64>,
    /// seed for LoRA init, prompt order and sampling
    #[serde(default = "defaults::uint::<3407>")]
    pub seed: u64,
    /// system turn for every rollout (overridden by input `system_prompt`)
    pub system_prompt: Option<String>,
    /// stop on a reward plateau: {rule: rolling, window: steps (null = half an epoch), min_gain: 0.05} or {rule: ema_rl, min_gain: 0.05} (the paper's code: checks at epochs 0.5, 1.5)
    pub early_stop: Option<EarlyStopParams>,
    /// steps averaged when picking the best-reward adapter
    #[serde(default = "defaults::int::<5>")]
    pub best_smoothing: usize,
    /// SFT steps on input `safety`: {every: k | share: s, batch_size: 4}
    // (Or on the regenerated set under `safety_source: current_policy`; the doc is pinned by
    // the `kind_params` golden, which changes only with a version bump.)
    pub interleave: Option<InterleaveParams>,
    /// where the interleaved safety conversations come from: precomputed (input `safety`: the reference model's answers from `safety_data`, or a fixed set) or current_policy (regenerated from the policy being trained, see `regenerate`)
    #[serde(default)]
    // Added after results were cached: at `precomputed` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    pub safety_source: SafetySource,
    /// for safety_source current_policy: {every: K RL steps, prompts: per regeneration (null = all), samples_per_prompt: 1, max_tokens: 600, temperature: 1, top_p: 1, min_safe: 70, min_coherent: 50, keep_unscored: false, batch_size: 16}; inputs `safety_prompts` and `safety_grader`
    #[serde(default)]
    // Added after results were cached: at `null` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    pub regenerate: Option<RegenerateParams>,
    /// RL steps between resumable checkpoints
    #[serde(default = "defaults::uint::<10>")]
    #[schemars(range(min = 1))]
    pub checkpoint_every: u64,
    /// judge for grader rewards: {backend: local} (model from input `judge_model`) or {backend: openai, base_url, model, api_key_env}
    #[serde(default)]
    // A tagged union, a mapping to the manifest; `{backend: local}` is the default every
    // existing key was made with (not the expanded local settings).
    #[schemars(with = "judge::JudgeParam", extend("default" = {"backend": "local"}))]
    pub judge: JudgeSpec,
    /// system prompt put before every rollout's system turn, in training only (null = off)
    pub inoculation: Option<String>,
    /// LDIFS regulariser {lambda, every: 5}: feature distance to the reference at every k-th layer
    pub ldifs: Option<LdifsParams>,
    /// recompute activations layer by layer in the backward pass: less GPU memory (the plan's estimate counts it), the same gradients within f32 rounding, about one more forward pass of time
    #[serde(default)]
    // Added after results were cached: at `false` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    pub gradient_checkpointing: bool,
    /// extra names for the model's chat template, as transformers' apply_chat_template(**kwargs): e.g. {enable_thinking: false} for Qwen3
    #[serde(default)]
    // Added after results were cached: at `{}` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    pub chat_template_kwargs: emflow_model::TemplateKwargs,
    /// every grader's pre-filter (0 without a call): words (emflow's), ema_rl (EMA_RL's standard graders: `\b\w+\b` words, empty checks, case-insensitive think split) or ema_rl_rhetoric (EMA_RL's ethos/pathos/logos grader: empty answer or think block only)
    #[serde(default)]
    // Added after results were cached: at `words` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    pub grader_prefilter: Prefilter,
    /// fractions of the run (each in (0, 1), increasing) after which the adapter is saved into output `snapshots`, for EM over training; [] = none
    #[serde(default)]
    // Added after results were cached: at `[]` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    pub snapshot_fractions: Vec<f64>,
    /// preventive steering: add steering_alpha x input `steering`'s persona vector at its layer's output in every training pass of the policy (not rollouts, not the reference; never saved with the adapter); null = off
    // Added after results were cached: at null it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    pub steering_alpha: Option<f64>,
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
    /// `safety_source: current_policy`: the regenerated set and its history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regeneration: Option<RegenState>,
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
        ensure!(
            !(self.steering_alpha.is_some() && self.num_iterations > 1),
            "steering_alpha needs num_iterations 1: the old policy's log-probs (eval mode) would be \
             unsteered while the ratio's numerator is steered, so clipping would act on the shift"
        );
        if let Some(e) = &self.early_stop {
            e.validate()?;
        }
        check_fractions(&self.snapshot_fractions)?;
        self.validate_safety_source()
    }

    /// `safety_source: current_policy` comes with `interleave` and `regenerate`; `regenerate`
    /// with nothing else.
    fn validate_safety_source(&self) -> Result<()> {
        let current = self.safety_source == SafetySource::CurrentPolicy;
        ensure!(
            !current || self.interleave.is_some(),
            "safety_source current_policy interleaves its answers: set `interleave` (e.g. {{every: 4, batch_size: 4}})"
        );
        ensure!(
            !current || self.regenerate.is_some(),
            "safety_source current_policy needs `regenerate` (at least {{every: K}})"
        );
        ensure!(
            current || self.regenerate.is_none(),
            "`regenerate` is set but safety_source is precomputed; set safety_source: current_policy or remove `regenerate`"
        );
        Ok(())
    }
}

impl Kind for RlKind {
    type Params = RlParams;

    fn describe(&self) -> KindInfo {
        // 4: metrics under TRL's names, rollouts' `completion` as messages, safety lines name
        // their `source`, regeneration lines their `every`.
        KindInfo::new("rl", 4, "GRPO (TRL semantics) with a rule-based or LLM-graded reward, KL to the reference, safety interleaving")
            .ports(
                "in   model          model     base model
                 in?  adapter        adapter   adapter to continue (e.g. the SFT warm-up)
                 in   prompts        messages  prompt conversations (the last turn is the user's)
                 in?  system_prompt  file      text file whose content is the rollout system prompt
                 in?  safety         messages  safety conversations for interleaved SFT steps (safety_source precomputed)
                 in?  safety_prompts messages  safety prompts the current policy answers (safety_source current_policy)
                 in?  safety_grader  file      safe/refusal grader, a 0-100 judge prompt over {question} and {answer} (safety_source current_policy)
                 in?  grader         file      grader prompt template, for `reward: {type: grader, template: {input: grader}}`
                 in?  judge_model    model     the grader's model for the local judge backend
                 in?  steering       dir       a persona_vector stage's vector, added (x steering_alpha) in training passes only
                 out  adapter        adapter   final adapter
                 out  best_adapter   adapter   adapter at the best smoothed mean reward
                 out  rollouts       samples   every completion with its reward, parts and advantage
                 out  metrics        metrics   one JSON object per step
                 out  summary        summary   samples_consumed, steps, best step, early stop
                 out  snapshots      dir       adapters at `snapshot_fractions` of the run, with index.json (steps, samples consumed)",
            )
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
    /// `max_completion_length`; completion tokens at the grader's `max_tokens`. Under
    /// `safety_source: current_policy` the same judge also scores every regenerated safety
    /// answer twice ([`regenerate::planned_judge_calls`]), counted on top.
    fn judge_estimate(&self, p: &RlParams, inputs: &PlanInputs) -> Result<Option<JudgeEstimate>> {
        let regen =
            (p.regenerate.as_ref()).filter(|_| p.safety_source == SafetySource::CurrentPolicy);
        if p.reward.graders().is_empty() && regen.is_none() {
            return Ok(None);
        }
        let judge = estimate::judge_name(&p.judge, inputs, "judge_model");
        let run = match planned_run(p, inputs)? {
            Ok(run) => run,
            Err(why) => return Ok(Some(JudgeEstimate::unknown(judge.0, judge.1, why))),
        };
        let mut estimate = grader_estimate(p, inputs, &run, judge)?;
        if let Some(r) = regen {
            add_regenerations(&mut estimate, p, r, run.steps, inputs)?;
        }
        Ok(Some(estimate))
    }

    /// Rollouts: prompts_per_step x num_generations sequences sampled at once; training: one
    /// micro-batch of them (grad_accum splits the batch), each prompt + completion long.
    fn memory_demand(&self, p: &RlParams) -> Option<MemoryDemand> {
        let rollouts = (p.prompts_per_step * p.num_generations) as u64;
        let tokens = (p.max_prompt_length + p.max_completion_length) as u64;
        Some(MemoryDemand {
            training: Some(super::memory::trainable(&p.lora, p.full_finetune)),
            train_batch: rollouts.div_ceil(p.grad_accum as u64),
            train_tokens: tokens,
            sample_batch: rollouts,
            sample_tokens: tokens,
            gradient_checkpointing: p.gradient_checkpointing,
            checkpointing_param: Some("gradient_checkpointing"),
            batch_param: "prompts_per_step",
            length_param: "max_completion_length",
        })
    }

    fn run(&self, ctx: &mut StageContext, p: &RlParams) -> Result<()> {
        p.validate()
            .with_context(|| format!("stage {}", ctx.stage_id))?;
        run_rl(ctx, p)
    }
}

/// The RL steps a run plans, where that number comes from, and the prompts when known.
struct PlannedRun {
    steps: u64,
    from: String,
    prompts: Option<Vec<Conversation>>,
}

/// The run's step count at plan time: `max_steps`, else the epochs over input `prompts`
/// (`Err`: why it must wait).
fn planned_run(p: &RlParams, inputs: &PlanInputs) -> Result<Result<PlannedRun, String>> {
    let prompts = match inputs.known("prompts") {
        Ok(a) => Some(read_conversations(a)?),
        Err(why) if p.max_steps.is_none() => {
            return Ok(Err(format!(
                "prompts {why} (the step count follows from them; or set max_steps)"
            )))
        }
        Err(_) => None,
    };
    let (steps, from) = match (p.max_steps, &prompts) {
        (Some(s), _) => (s, "max_steps".to_string()),
        (None, Some(ps)) => (
            (p.epochs * ps.len() as u64).div_ceil(p.prompts_per_step as u64),
            format!(
                "{} epochs of {} prompts from {}",
                p.epochs,
                ps.len(),
                estimate::origin(inputs, "prompts")
            ),
        ),
        (None, None) => bail!("no step count: neither max_steps nor prompts are known"),
    };
    Ok(Ok(PlannedRun {
        steps,
        from,
        prompts,
    }))
}

/// The grader rewards' calls over `run` (none without a grader), to `judge` (its name, and
/// whether it is local).
fn grader_estimate(
    p: &RlParams,
    inputs: &PlanInputs,
    run: &PlannedRun,
    (judge_model, local): (String, bool),
) -> Result<JudgeEstimate> {
    let read_port = |port: &str| -> Result<String> {
        let a = inputs
            .known(port)
            .map_err(|why| anyhow::anyhow!("input `{port}`: {why}"))?;
        std::fs::read_to_string(&a.path).with_context(|| format!("reading {}", a.origin))
    };
    let numbers = (p.reward.graders().iter())
        .map(|g| g.numbers(TemplateInputs::Read(&read_port)))
        .collect::<Result<Vec<_>>>()
        .context("reading the grader template")?;
    let rollouts = run.steps * p.prompts_per_step as u64 * p.num_generations as u64;
    let mean_prompt_chars = match &run.prompts {
        Some(ps) if !ps.is_empty() => {
            let user = |c: &Conversation| {
                let last = c.messages.iter().rev().find(|m| m.role == "user");
                last.map_or(0, |m| m.content.chars().count())
            };
            ps.iter().map(user).sum::<usize>() / ps.len()
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
    let mut notes = Vec::new();
    if !numbers.is_empty() {
        notes.push(format!(
            "{} steps ({}) x {} prompts x {} generations x {} grader(s); rollouts counted at max_completion_length {}",
            run.steps,
            run.from,
            p.prompts_per_step,
            p.num_generations,
            numbers.len(),
            p.max_completion_length
        ));
        if run.prompts.is_none() {
            notes.push("prompt lengths not known before the prompts exist: not counted".into());
        }
    }
    let mut fewer = Vec::new();
    if numbers.iter().any(|n| n.may_skip) {
        fewer.push("answers under the grader's word minimums get 0 without a call");
    }
    if p.early_stop.is_some() {
        fewer.push("early_stop can end the run sooner");
    }
    if !fewer.is_empty() {
        notes.push(format!("upper bound: {}", fewer.join("; ")));
    }
    Ok(JudgeEstimate {
        judge_model,
        local,
        calls: Some(rollouts * numbers.len() as u64),
        upper_bound: !fewer.is_empty(),
        prompt_tokens,
        completion_tokens,
        notes,
    })
}

/// Adds the judge calls of `safety_source: current_policy`'s regenerations over `steps` RL
/// steps to `e`, or a note saying why they cannot be counted yet.
fn add_regenerations(
    e: &mut JudgeEstimate,
    p: &RlParams,
    r: &RegenerateParams,
    steps: u64,
    inputs: &PlanInputs,
) -> Result<()> {
    let Some(setting) = interleave_setting(p.interleave.as_ref())? else {
        bail!("safety_source current_policy needs `interleave`");
    };
    let not_counted = |why: String| {
        format!("not counted: the judge calls of the safety answers regenerated from the current policy ({why})")
    };
    let grader = match inputs.known("safety_grader") {
        Ok(a) => {
            let text = std::fs::read_to_string(&a.path)
                .with_context(|| format!("reading {}", a.origin))?;
            parse_judge_prompt(&text, &format!("safety grader {}", a.origin))?
        }
        Err(why) => {
            e.notes.push(not_counted(format!("safety_grader {why}")));
            return Ok(());
        }
    };
    let pool = match inputs.known("safety_prompts") {
        Ok(a) => Ok(onpolicy::read_prompts(a)?),
        Err(why) => Err(format!("safety_prompts {why}")),
    };
    let planned =
        regenerate::planned_judge_calls(r, (setting.0, steps), pool.as_deref().ok(), &grader);
    let planned = match planned {
        Ok(planned) => planned,
        Err(why) => {
            let pool_why = pool.err().unwrap_or_default();
            e.notes.push(not_counted(format!("{why:#}; {pool_why}")));
            return Ok(());
        }
    };
    e.calls = e.calls.map(|c| c + planned.calls);
    e.prompt_tokens += planned.prompt_tokens.unwrap_or(0);
    e.completion_tokens += planned.calls * estimate::score_completion_tokens(&p.judge);
    let (kept_each, at_most) = planned.regenerations;
    e.notes.push(format!(
        "+ {} calls: {kept_each} regenerations from the current policy (the first at the first safety step, then the first safety step >= {} steps later) x {} answers (prompts x samples_per_prompt {}) x 2 judge prompts (safe grader, coherent); answers counted at max_tokens {}",
        planned.calls, r.every, planned.answers_per_regeneration, r.samples_per_prompt, r.max_tokens
    ));
    e.notes.push(format!(
        "assumes each regeneration keeps an answer: one that keeps none is repeated at the next safety step, up to {at_most} regenerations ({} calls)",
        2 * at_most * planned.answers_per_regeneration
    ));
    if let (None, Err(why)) = (planned.prompt_tokens, &pool) {
        e.notes
            .push(format!("regeneration prompt tokens not counted: {why}"));
    }
    Ok(())
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

pub(crate) fn run_rl(ctx: &mut StageContext, p: &RlParams) -> Result<()> {
    ctx.progress().phase("loading", 0, "");
    let reward = prepare_reward(ctx, p)?;
    let mut policy = load_policy(ctx, &p.lora, p.full_finetune, p.seed)?;
    policy.lm.chat.set_kwargs(p.chat_template_kwargs.clone())?;
    crate::train::steering::install(ctx, p.steering_alpha, &mut policy)?;
    // A local judge loads its own copy of `judge_model`, even when it is the policy's base
    // model: the model layer's `Transformer` cannot yet share its frozen weights with a
    // second owner (see the report on issue 4).
    // The same judge grades the rewards and, under `safety_source: current_policy`, the
    // regenerated safety answers.
    let regen = match (&p.regenerate, p.safety_source) {
        (Some(r), SafetySource::CurrentPolicy) => Some(Regenerator::load(ctx, r, p.seed)?),
        _ => None,
    };
    let judge = if reward.needs_judge() || regen.is_some() {
        let judge = judge::for_stage(ctx, &p.judge)
            .with_context(|| format!("stage {}: building the grader's judge", ctx.stage_id))?;
        Some(judge)
    } else {
        None
    };
    let prompts = encode_prompts(ctx, p, &policy)?;
    let safety = load_safety(ctx, p, &policy)?;
    let mut run = RlRun::start(ctx, p, policy, (safety, regen), prompts.ids.len())?;
    let src = StepSources {
        prompts: &prompts,
        reward: &reward,
        judge: judge.as_deref(),
    };
    run.train(ctx, p, &src)?;
    run.finish(ctx)
}

/// The interleaved safety batches: input `safety`'s conversations (`precomputed`), or none
/// yet (`current_policy`: the first regeneration fills them).
fn load_safety(ctx: &StageContext, p: &RlParams, policy: &Policy) -> Result<Option<Interleave>> {
    let setting = interleave_setting(p.interleave.as_ref())?;
    match (p.safety_source, setting) {
        (SafetySource::Precomputed, setting) => {
            Interleave::load(ctx, setting, policy, None, p.seed)
        }
        (SafetySource::CurrentPolicy, Some(setting)) => {
            if ctx.optional_input("safety")?.is_some() {
                bail!(
                    "stage {}: input `safety` is wired but safety_source is current_policy, which regenerates \
                     its safety data from input `safety_prompts`; unwire `safety` or set safety_source: precomputed",
                    ctx.stage_id
                );
            }
            Ok(Some(Interleave::empty(setting, p.seed)))
        }
        (SafetySource::CurrentPolicy, None) => {
            bail!("safety_source current_policy needs `interleave`")
        }
    }
}

/// The stage's reward, its grader templates read from the inputs they name.
fn prepare_reward(ctx: &StageContext, p: &RlParams) -> Result<Reward> {
    let read_port = |port: &str| -> Result<String> {
        let f = ctx.optional_input(port)?.with_context(|| {
            format!("the reward's template names input `{port}`, but the stage does not wire it")
        })?;
        std::fs::read_to_string(&f.path).with_context(|| format!("reading {}", f.origin))
    };
    let mut reward = p
        .reward
        .prepare(TemplateInputs::Read(&read_port))
        .with_context(|| format!("stage {}: preparing the reward", ctx.stage_id))?;
    reward.set_prefilter(p.grader_prefilter);
    Ok(reward)
}

/// The prompts under the rollout system turn (input `system_prompt`, else the param, after
/// the inoculation prompt), each ending in a user turn, encoded and cut to the last
/// `max_prompt_length` tokens.
fn encode_prompts(ctx: &StageContext, p: &RlParams, policy: &Policy) -> Result<EncodedPrompts> {
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
    let convs = read_conversations(ctx.input("prompts")?)?;
    let mut prompts = EncodedPrompts {
        ids: Vec::with_capacity(convs.len()),
        messages: Vec::with_capacity(convs.len()),
    };
    for (i, c) in convs.iter().enumerate() {
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
        prompts.ids.push(ids);
        prompts.messages.push(msgs);
    }
    Ok(prompts)
}

/// The GRPO step's settings from the stage's params.
fn grpo_config(p: &RlParams, policy: &Policy) -> GrpoConfig {
    let num_layers = policy.lm.config.num_layers;
    GrpoConfig {
        seed: p.seed,
        num_generations: p.num_generations,
        grad_accum: p.grad_accum,
        num_iterations: p.num_iterations,
        temperature: p.temperature,
        scale_rewards: p.scale_rewards,
        max_grad_norm: p.max_grad_norm,
        reference: p.beta != 0.0 || p.log_kl,
        loss: GrpoLossConfig {
            loss_type: p.loss_type,
            importance_sampling: p.importance_sampling_level,
            epsilon_low: p.epsilon,
            epsilon_high: p.epsilon_high.unwrap_or(p.epsilon),
            beta: p.beta,
            max_completion_length: p.max_completion_length,
        },
        sampling: SamplingParams {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            min_p: p.min_p,
            max_new_tokens: p.max_completion_length,
            stop: Vec::new(),
        },
        ldifs: Ldifs::new(p.ldifs.as_ref().map(|l| (l.lambda, l.layers(num_layers)))),
        gradient_checkpointing: p.gradient_checkpointing,
    }
}

fn ckpt_root(ctx: &StageContext) -> PathBuf {
    ctx.checkpoint_dir().join("rl")
}

/// An RL run in progress: the policy and its optimizer, the loop state, the logs.
struct RlRun {
    policy: Policy,
    opt: AdamW,
    schedule: LrSchedule,
    cfg: GrpoConfig,
    safety: Option<Interleave>,
    /// `safety_source: current_policy`: what regenerates `safety`'s examples.
    regen: Option<Regenerator>,
    cursor: Cursor,
    state: RlState,
    metrics: JsonlLog,
    rollouts: JsonlLog,
    total_steps: u64,
    /// Steps per early-stop window, when `early_stop` is set with the rolling rule.
    early_window: Option<usize>,
    /// Completion tokens sampled and tokens trained per second (the log and the stage
    /// record only).
    speed: [Throughput; 2],
    /// When the `ema_rl` rule checks, when `early_stop` is set with it.
    ema_rl: Option<EmaRlSchedule>,
    snapshots: Snapshots,
}

impl RlRun {
    /// The run over `n_prompts` prompts: its length, learning-rate schedule and optimizer,
    /// then the newest checkpoint's state and logs if there is one.
    fn start(
        ctx: &StageContext,
        p: &RlParams,
        mut policy: Policy,
        (mut safety, regen): (Option<Interleave>, Option<Regenerator>),
        n_prompts: usize,
    ) -> Result<Self> {
        let total_steps = match p.max_steps {
            Some(s) => s,
            None => (p.epochs * n_prompts as u64).div_ceil(p.prompts_per_step as u64),
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
        let mut opt = optimizer(&policy, p.weight_decay)?;
        let cfg = grpo_config(p, &policy);
        let logs = [
            ("metrics", ctx.output_path("metrics")),
            ("rollouts", ctx.output_path("rollouts")),
        ];
        let (resumed, logs) =
            resume_with_logs::<RlState>(&ckpt_root(ctx), &mut policy, &mut opt, &logs)?;
        if let Some(r) = &resumed {
            let resuming = format!("resuming from checkpoint after RL step {}", r.steps);
            ctx.progress().log(&resuming);
        }
        let mut state: RlState = resumed.unwrap_or_default();
        if regen.is_some() {
            let regenerated = state.regeneration.get_or_insert_with(RegenState::default);
            if let Some(s) = safety.as_mut().filter(|_| !regenerated.set.is_empty()) {
                s.replace_examples(regenerate::encode_set(&policy, &regenerated.set)?);
            }
        }
        if let Some(s) = safety.as_mut() {
            s.seek(state.safety_consumed);
        }
        let [metrics, rollouts]: [JsonlLog; 2] = logs
            .try_into()
            .map_err(|_| anyhow::anyhow!("resume_with_logs opens one log per name"))?;
        Ok(RlRun {
            speed: Default::default(),
            cursor: Cursor::new(n_prompts, p.seed, "prompts", state.prompts_consumed),
            early_window: p
                .early_stop
                .as_ref()
                .filter(|e| e.rule == EarlyStopRule::Rolling)
                .map(|e| {
                    e.window
                        .unwrap_or_else(|| n_prompts.div_ceil(2 * p.prompts_per_step).max(1))
                }),
            ema_rl: p
                .early_stop
                .as_ref()
                .filter(|e| e.rule == EarlyStopRule::EmaRl)
                .map(|e| EmaRlSchedule {
                    steps_per_epoch: n_prompts as f64 / p.prompts_per_step as f64,
                    epochs: p.epochs,
                    checks_per_epoch: e.checks_per_epoch,
                    log_every: e.log_every,
                }),
            snapshots: Snapshots::plan(
                ctx.checkpoint_dir().join("rl-snapshots"),
                &p.snapshot_fractions,
                total_steps,
            ),
            policy,
            opt,
            schedule,
            cfg,
            safety,
            regen,
            state,
            metrics,
            rollouts,
            total_steps,
        })
    }

    /// Steps until `total_steps` or an early stop; each is a GRPO step, then the safety
    /// steps due after it, then (every `checkpoint_every` steps or when asked to stop) a
    /// checkpoint.
    fn train(&mut self, ctx: &StageContext, p: &RlParams, src: &StepSources) -> Result<()> {
        let progress = ctx.progress_handle();
        progress.phase("rl", self.total_steps, "steps");
        progress.inc(self.state.steps);
        while self.state.steps < self.total_steps && self.state.stopped_early.is_none() {
            let step = self.state.steps;
            let picked = self.cursor.take(p.prompts_per_step);
            let opt = (&mut self.opt, &self.schedule);
            let out = grpo_step(
                &mut self.policy,
                opt,
                &mut self.state.updates,
                &self.cfg,
                src,
                picked,
            )
            .with_context(|| format!("stage {}: RL step {step}", ctx.stage_id))?;
            self.state.steps += 1;
            self.state.prompts_consumed = self.cursor.consumed;
            self.log_step(ctx, step, &out, src.prompts)?;
            if self
                .state
                .tracker
                .record(step, out.mean_reward(), p.best_smoothing)
            {
                save_best(ctx, &self.policy)?;
            }
            self.safety_steps(ctx, step, src.judge)?;
            let policy = &self.policy;
            self.snapshots
                .take(self.state.steps, self.state.prompts_consumed, |dir| {
                    policy.save(dir)
                })?;
            self.check_plateau(ctx, step, p.early_stop.as_ref());
            let finished =
                self.state.steps >= self.total_steps || self.state.stopped_early.is_some();
            let due =
                self.state.steps.is_multiple_of(p.checkpoint_every) || ctx.interrupt_requested();
            if !finished && due {
                let logs = [&self.metrics, &self.rollouts];
                save_checkpoint(&ckpt_root(ctx), &self.policy, &self.opt, &self.state, &logs)?;
                ctx.check_interrupt()?;
            }
        }
        Ok(())
    }

    /// The step's rollouts and metrics lines; its timings and reward to the progress log.
    fn log_step(
        &mut self,
        ctx: &StageContext,
        step: u64,
        out: &StepOutcome,
        prompts: &EncodedPrompts,
    ) -> Result<()> {
        for row in out.rollout_rows(step, prompts, self.cfg.num_generations) {
            self.rollouts.append(&row)?;
        }
        self.metrics
            .append(&out.metrics(step, &self.cfg, self.state.prompts_consumed))?;
        // Timings go to the log, never into an output: outputs must be the same bytes on every
        // run (`emflow verify`), and wall-clock figures are not.
        let t = &out.timing;
        let [sampling, training] = &mut self.speed;
        let sampled = sampling.add(out.stats.step_tokens as u64, t.sampling);
        let trained = training.add(out.trained_tokens(&self.cfg), t.training);
        let progress = ctx.progress_handle();
        progress.log(&format!(
            "step {step}: {:.1}s (sampling {:.1}s at {sampled:.0} tok/s, reward {:.1}s, training {:.1}s at {trained:.0} tok/s)",
            t.sampling + t.reward + t.training,
            t.sampling,
            t.reward,
            t.training
        ));
        progress.message(&format!("reward {:.3}", out.mean_reward()));
        progress.inc(1);
        Ok(())
    }

    /// The interleaved safety SFT steps due after RL step `step`, at the last update's
    /// learning rate; under `safety_source: current_policy`, after regenerating the set
    /// when it is due.
    fn safety_steps(
        &mut self,
        ctx: &StageContext,
        step: u64,
        judge: Option<&dyn judge::Judge>,
    ) -> Result<()> {
        let Some(safety) = self.safety.as_mut() else {
            return Ok(());
        };
        let due = safety.steps_after(self.state.steps);
        if let (Some(regen), Some(state), true) =
            (&self.regen, self.state.regeneration.as_mut(), due > 0)
        {
            let line =
                regenerate::refresh(regen, &self.policy, judge, self.state.steps, state, safety)
                    .with_context(|| {
                        format!(
                            "stage {}: regenerating safety data after RL step {step}",
                            ctx.stage_id
                        )
                    })?;
            if let Some(line) = line {
                ctx.progress_handle().log(&format!(
                    "safety data regenerated after step {step}: {line}"
                ));
                self.metrics.append(&line)?;
                self.state.safety_consumed = safety.consumed();
            }
            if safety.is_empty() {
                state.skipped_safety_steps += due;
                return Ok(());
            }
        }
        let cfg = SftStepConfig {
            micro_batch: safety.batch_size(),
            kl_lambda: 0.0,
            ldifs: None,
            max_grad_norm: self.cfg.max_grad_norm,
            gradient_checkpointing: self.cfg.gradient_checkpointing,
        };
        for _ in 0..due {
            let batch = safety.next_batch();
            let lr = self
                .schedule
                .lr_at(self.state.updates.saturating_sub(1) as usize);
            let s = sft_step(&mut self.policy, &batch, &cfg, &mut self.opt, lr)?;
            self.state.safety_steps += 1;
            self.state.safety_consumed = safety.consumed();
            self.metrics.append(&json!({
                "step": step, "batch": "safety", "source": safety.source(), "loss": s.loss, "nll": s.nll,
                "learning_rate": lr, "grad_norm": s.grad_norm, "tokens": s.tokens, "safety_consumed": safety.consumed(),
            }))?;
        }
        Ok(())
    }

    /// Stops the run when the mean reward gained less than `min_gain`: over the last window
    /// (`rolling`), or between EMA_RL's check intervals (`ema_rl`).
    fn check_plateau(&mut self, ctx: &StageContext, step: u64, es: Option<&EarlyStopParams>) {
        let Some(es) = es else {
            return;
        };
        let tracker = &mut self.state.tracker;
        let why = match (self.early_window, &self.ema_rl) {
            (Some(window), _) => tracker.plateaued(window, es.min_gain).map(|gain| {
                format!(
                    "mean reward gained {gain:.4} < {} over the last {window} steps",
                    es.min_gain
                )
            }),
            (None, Some(schedule)) => tracker.ema_rl_check(schedule, es.min_gain).map(|(gain, epoch)| {
                format!(
                    "mean reward gained {gain:.4} < {} between EMA_RL's check intervals (checked at epoch {epoch:.3})",
                    es.min_gain
                )
            }),
            (None, None) => None,
        };
        if let Some(why) = why {
            ctx.progress_handle()
                .log(&format!("early stop after step {step}: {why}"));
            self.state.stopped_early = Some(why);
        }
    }

    /// Writes the final and the best adapters, the snapshots and the summary.
    fn finish(self, ctx: &mut StageContext) -> Result<()> {
        self.policy.save(&ctx.output_path("adapter"))?;
        self.snapshots
            .publish(&ctx.output_path("snapshots"), self.state.steps)?;
        crate::train::checkpoint::copy_dir(&best_dir(ctx), &ctx.output_path("best_adapter"))
            .context("copying the best-reward adapter")?;
        let state = &self.state;
        let (best_step, best_reward) = state.tracker.best().unwrap_or((0, f64::NAN));
        let summary = json!({
            "samples_consumed": state.prompts_consumed,
            "completions": state.prompts_consumed * self.cfg.num_generations as u64,
            "steps": state.steps,
            "updates": state.updates,
            "safety_steps": state.safety_steps,
            "best_step": best_step,
            "best_reward": best_reward,
            "stopped_early": state.stopped_early,
        });
        let mut summary = summary;
        // `precomputed` writes the summary it always wrote (its bytes are outputs).
        if let (Some(fields), Some(r)) = (summary.as_object_mut(), &state.regeneration) {
            fields.extend(regenerate::summary(r));
        }
        super::write_summary(ctx, summary)?;
        let [sampling, training] = &self.speed;
        sampling.summarize(ctx, "sample_tokens_per_s");
        training.summarize(ctx, "train_tokens_per_s");
        Ok(())
    }
}

fn best_dir(ctx: &StageContext) -> PathBuf {
    ctx.checkpoint_dir().join("rl-best")
}

/// Saves the policy as the best-reward adapter so far (replaced atomically).
fn save_best(ctx: &StageContext, policy: &Policy) -> Result<()> {
    let tmp = ctx.checkpoint_dir().join("rl-best-new");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    policy.save(&tmp)?;
    replace_dir_atomically(&tmp, &best_dir(ctx))?;
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
