//! One GRPO step of the `rl` kind, in the order it happens ([`grpo_step`]): [`sample`] the
//! group of completions of each prompt, [`score`] them with the stage's reward, turn the
//! rewards into group-relative advantages, and [`train`] for `num_iterations` optimizer
//! updates; then [`StepOutcome::metrics`] and [`StepOutcome::rollout_rows`] say what it did
//! for the logs. The objective is [`super::grpo_loss`]; the KL and LDIFS terms toward the
//! reference are [`super::regularise`].
//!
//! Row seeds come from `derive_seed(seed, prompt index, epoch x G + g)`, so sampling does
//! not depend on batch sizes. With `num_iterations = 1` the "old" policy is the current one
//! detached (ratio 1, as in TRL); otherwise the sampling policy's log-probs are computed once
//! before the first update.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use emflow_model::{
    accumulate, clip_grad_norm, derive_seed, token_logprobs, AdamW, Finish, Generation,
    GenerationRequest, LrSchedule, Message, SamplingParams, TrainPass,
};
use serde_json::{json, Value};

use super::batch::{collate_rollouts, RolloutBatch};
use super::grpo_loss::{
    compute_advantages, grpo_loss, AdvantageScaling, Advantages, GrpoLossConfig, MicroBatch,
    StepShape,
};
use super::policy::Policy;
use super::regularise::{ldifs_distance, reference_forward, Ldifs};
use super::scalar;
use crate::judge::Judge;
use crate::reward::{Reward, RewardInput, RewardOutput};

/// The settings of every step of a run, gathered from the stage's params once.
pub struct GrpoConfig {
    pub seed: u64,
    /// Completions per prompt (G).
    pub num_generations: usize,
    pub grad_accum: usize,
    pub num_iterations: usize,
    /// Also applied to the training log-probs, as TRL does.
    pub temperature: f64,
    pub scale_rewards: AdvantageScaling,
    pub max_grad_norm: f64,
    /// Whether the reference log-probs are computed: for the k3 term (`beta > 0`), or only
    /// for the log (`log_kl`).
    pub reference: bool,
    pub loss: GrpoLossConfig,
    pub sampling: SamplingParams,
    pub ldifs: Ldifs,
    /// Recompute activations layer by layer in the backward pass (less memory, the same
    /// gradients within f32 rounding).
    pub gradient_checkpointing: bool,
}

/// The stage's prompts, encoded once: token ids (cut to the prompt length) and the
/// messages they came from (logged with every rollout).
pub struct EncodedPrompts {
    pub ids: Vec<Vec<u32>>,
    pub messages: Vec<Vec<Message>>,
}

/// One step's completions: row `i` answers prompt `picked[i / G]`.
pub struct Rollouts {
    /// (prompt index, epoch it was drawn in).
    pub picked: Vec<(usize, u64)>,
    pub requests: Vec<GenerationRequest>,
    pub generations: Vec<Generation>,
}

/// Time split of one step, in seconds (for the log only: never an output).
#[derive(Default)]
pub struct Timing {
    pub sampling: f64,
    pub reward: f64,
    pub training: f64,
}

/// What a step's updates measured: sums over its micro-batches, as logged.
#[derive(Default)]
pub struct TrainStats {
    loss: f64,
    kl: f64,
    ldifs: f64,
    clip: f64,
    clip_low: f64,
    clip_high: f64,
    entropy: f64,
    /// Of the last update.
    pub grad_norm: f64,
    pub lr: f64,
    /// Completion tokens of the step.
    pub step_tokens: usize,
}

/// Everything one step did.
pub struct StepOutcome {
    pub rollouts: Rollouts,
    pub scored: Vec<RewardOutput>,
    pub advantages: Advantages,
    pub stats: TrainStats,
    pub timing: Timing,
}

/// What a run's steps sample from and how their completions are scored.
pub struct StepSources<'a> {
    pub prompts: &'a EncodedPrompts,
    pub reward: &'a Reward,
    /// The judge of grader rewards.
    pub judge: Option<&'a dyn Judge>,
}

/// One GRPO step on the prompts `picked`; `updates` counts optimizer updates (the
/// schedule's position) and advances by `num_iterations`.
pub fn grpo_step(
    policy: &mut Policy,
    (opt, schedule): (&mut AdamW, &LrSchedule),
    updates: &mut u64,
    cfg: &GrpoConfig,
    src: &StepSources,
    picked: Vec<(usize, u64)>,
) -> Result<StepOutcome> {
    let mut timing = Timing::default();
    let t0 = Instant::now();
    let rollouts = sample(policy, src.prompts, picked, cfg)?;
    timing.sampling = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let scored = score(&rollouts, src, cfg.num_generations)?;
    timing.reward = t0.elapsed().as_secs_f64();
    let rewards: Vec<f64> = scored.iter().map(|r| r.total).collect();
    let advantages = compute_advantages(&rewards, cfg.num_generations, cfg.scale_rewards)?;
    let t0 = Instant::now();
    let stats = train(policy, opt, schedule, updates, &rollouts, &advantages, cfg)?;
    timing.training = t0.elapsed().as_secs_f64();
    Ok(StepOutcome {
        rollouts,
        scored,
        advantages,
        stats,
        timing,
    })
}

/// Samples `num_generations` completions of each picked prompt with the current policy.
pub fn sample(
    policy: &Policy,
    prompts: &EncodedPrompts,
    picked: Vec<(usize, u64)>,
    cfg: &GrpoConfig,
) -> Result<Rollouts> {
    let g = cfg.num_generations;
    let mut requests = Vec::with_capacity(picked.len() * g);
    for (idx, epoch) in &picked {
        for k in 0..g {
            requests.push(GenerationRequest {
                prompt_ids: prompts.ids[*idx].clone(),
                seed: derive_seed(cfg.seed, &idx.to_string(), epoch * g as u64 + k as u64),
            });
        }
    }
    let lm = &policy.lm;
    let generations = lm.model.generate(
        &lm.tokenizer,
        &requests,
        &cfg.sampling,
        requests.len(),
        &|_| {},
    )?;
    Ok(Rollouts {
        picked,
        requests,
        generations,
    })
}

/// The reward of every completion, against its prompt's last turn.
pub fn score(rollouts: &Rollouts, src: &StepSources, g: usize) -> Result<Vec<RewardOutput>> {
    let inputs: Vec<RewardInput> = rollouts
        .picked
        .iter()
        .flat_map(|(idx, _)| std::iter::repeat_n(*idx, g))
        .zip(&rollouts.generations)
        .map(|(idx, gen)| RewardInput {
            prompt: src.prompts.messages[idx]
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            completion: gen.text.clone(),
        })
        .collect();
    src.reward
        .score_batch(&inputs, src.judge)
        .context("scoring the rollouts")
}

/// The step's `num_iterations` optimizer updates on its rollouts, each over `grad_accum`
/// micro-batches.
pub fn train(
    policy: &mut Policy,
    opt: &mut AdamW,
    schedule: &LrSchedule,
    updates: &mut u64,
    rollouts: &Rollouts,
    adv: &Advantages,
    cfg: &GrpoConfig,
) -> Result<TrainStats> {
    let rows: Vec<(&[u32], &[u32])> = rollouts
        .requests
        .iter()
        .zip(&rollouts.generations)
        .map(|(r, gen)| (r.prompt_ids.as_slice(), gen.tokens.as_slice()))
        .collect();
    let micro = rows.len() / cfg.grad_accum;
    let mut stats = TrainStats {
        step_tokens: rollouts.generations.iter().map(|g| g.tokens.len()).sum(),
        ..Default::default()
    };
    let fixed = FixedLogps {
        old: if cfg.num_iterations > 1 {
            Some(logps_no_grad(policy, &rows, micro, cfg.temperature)?)
        } else {
            None
        },
        reference: if cfg.reference {
            Some(policy.with_adapter_off(|r| logps_no_grad(r, &rows, micro, cfg.temperature))?)
        } else {
            None
        },
    };
    for _ in 0..cfg.num_iterations {
        let mut grads = None;
        for (m, chunk) in rows.chunks(micro).enumerate() {
            let adv = &adv.values[m * micro..(m + 1) * micro];
            let g = micro_batch_backward(policy, chunk, m, adv, &fixed, cfg, &mut stats)?;
            accumulate(&mut grads, &policy.vars, g, 1.0)?;
        }
        let mut grads = grads.context("no gradients were produced")?;
        stats.grad_norm = clip_grad_norm(&policy.vars, &mut grads, cfg.max_grad_norm)?;
        stats.lr = schedule.lr_at(*updates as usize);
        opt.step(&grads, stats.lr)?;
        *updates += 1;
    }
    Ok(stats)
}

/// Log-probs that stay fixed through a step's updates, one tensor per micro-batch.
struct FixedLogps {
    /// Of the sampling policy, when there is more than one update.
    old: Option<Vec<Tensor>>,
    /// Of the reference (adapter off).
    reference: Option<Vec<Tensor>>,
}

/// The gradients of micro-batch `m`'s loss, the GRPO objective plus the LDIFS term, with
/// activations recomputed layer by layer under `cfg.gradient_checkpointing`
/// (`Transformer::train_backward`); adds its figures to `stats`.
fn micro_batch_backward(
    policy: &mut Policy,
    chunk: &[(&[u32], &[u32])],
    m: usize,
    adv: &[f64],
    fixed: &FixedLogps,
    cfg: &GrpoConfig,
    stats: &mut TrainStats,
) -> Result<GradStore> {
    let device = policy.lm.model.device().clone();
    let b = collate_rollouts(chunk, policy.lm.tokenizer.pad_id(), &device)?;
    // LDIFS reference features: adapter off, frozen weights only, so no graph.
    let ref_hidden = if cfg.ldifs.is_on() {
        reference_forward(policy, &b.ids, &b.attention, &cfg.ldifs.layers)?.1
    } else {
        Vec::new()
    };
    let adv_t = Tensor::from_vec(
        adv.iter().map(|a| *a as f32).collect::<Vec<_>>(),
        adv.len(),
        &device,
    )?;
    let hidden_size = policy.lm.config.hidden_size;
    let inputs = LossInputs {
        batch: &b,
        advantages: &adv_t,
        old_logps: fixed.old.as_ref().map(|o| &o[m]),
        ref_logps: fixed.reference.as_ref().map(|r| &r[m]),
        ref_hidden: &ref_hidden,
        hidden_size,
    };
    let (_, grads) = policy.lm.model.train_backward(
        &b.ids,
        &b.attention,
        &cfg.ldifs.layers,
        cfg.gradient_checkpointing,
        |pass| micro_batch_loss(pass, &inputs, cfg, stats),
    )?;
    Ok(grads)
}

/// What [`micro_batch_loss`] reads besides the policy's pass.
struct LossInputs<'a> {
    batch: &'a RolloutBatch,
    advantages: &'a Tensor,
    old_logps: Option<&'a Tensor>,
    ref_logps: Option<&'a Tensor>,
    ref_hidden: &'a [Tensor],
    hidden_size: usize,
}

/// The micro-batch's loss from the policy's pass; adds its figures to `stats`.
fn micro_batch_loss(
    pass: &TrainPass,
    inputs: &LossInputs,
    cfg: &GrpoConfig,
    stats: &mut TrainStats,
) -> Result<Tensor> {
    let b = inputs.batch;
    // Scored only where they predict completion tokens (the prompt's positions would be
    // projected to the vocabulary and thrown away).
    let scores = pass.scores(
        (b.first_predicting_position(), b.completion_len),
        &b.completion,
        cfg.temperature,
    )?;
    let out = grpo_loss(
        &cfg.loss,
        &MicroBatch {
            policy_logps: &scores.logprobs,
            old_logps: inputs.old_logps,
            ref_logps: inputs.ref_logps,
            mask: &b.completion_mask,
            advantages: inputs.advantages,
        },
        StepShape {
            grad_accum_steps: cfg.grad_accum,
            step_tokens: stats.step_tokens as f64,
        },
    )?;
    let mut loss = out.loss.clone();
    if let Some(dist) = ldifs_distance(
        pass.hidden(),
        inputs.ref_hidden,
        &b.attention,
        inputs.hidden_size,
    )? {
        // Each micro-batch is 1/grad_accum of the step, as in the policy loss.
        stats.ldifs += scalar(&dist)?;
        loss = (loss + (dist * (cfg.ldifs.lambda / cfg.grad_accum as f64))?)?;
    }
    // Entropy of the (temperature-scaled) next-token distribution, for the log.
    stats.entropy += scalar(&(scores.entropy * &b.completion_mask)?.sum_all()?)?;
    stats.loss += scalar(&loss)?;
    stats.kl += out.stats.kl.unwrap_or(0.0);
    stats.clip += out.stats.clip_region;
    stats.clip_low += out.stats.clip_low;
    stats.clip_high += out.stats.clip_high;
    Ok(loss)
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
            let b: RolloutBatch = collate_rollouts(chunk, pad, &device)?;
            let logits = policy.lm.model.forward_eval(&b.ids, &b.attention)?;
            Ok(
                token_logprobs(&b.completion_logits(&logits)?, &b.completion, temperature)?
                    .detach(),
            )
        })
        .collect()
}

impl StepOutcome {
    /// The step's line of the `metrics` log (`samples_consumed`: prompts used so far). The
    /// names are TRL's GRPOTrainer's, a `/` in TRL's written `_` (`completions/min_length` is
    /// `completions_min_length`); docs/training-logs.md maps each.
    pub fn metrics(&self, step: u64, cfg: &GrpoConfig, samples_consumed: u64) -> Value {
        let (gens, s) = (&self.rollouts.generations, &self.stats);
        let n = self.scored.len() as f64;
        let n_micro = (cfg.grad_accum * cfg.num_iterations) as f64;
        let group_std = &self.advantages.group_std;
        let reward_std = group_std.iter().sum::<f64>() / group_std.len().max(1) as f64;
        let lengths: Vec<usize> = gens.iter().map(|gen| gen.tokens.len()).collect();
        let truncated = gens
            .iter()
            .filter(|gen| matches!(gen.finish, Finish::Length))
            .count() as f64
            / n;
        json!({
            "step": step, "batch": "rl", "reward": self.mean_reward(), "reward_std": reward_std, "rewards": self.mean_parts(),
            "frac_reward_zero_std": self.advantages.frac_zero_std, "loss": s.loss / cfg.num_iterations as f64,
            "kl": cfg.reference.then(|| s.kl / n_micro),
            "ldifs": if cfg.ldifs.is_on() { Some(s.ldifs / n_micro) } else { None },
            "clip_ratio": s.clip / n_micro, "clip_ratio_low_mean": s.clip_low / n_micro, "clip_ratio_high_mean": s.clip_high / n_micro,
            "entropy": s.entropy / s.step_tokens.max(1) as f64, "grad_norm": s.grad_norm, "learning_rate": s.lr,
            "completion_length": s.step_tokens as f64 / n, "completions_min_length": lengths.iter().min(),
            "completions_max_length": lengths.iter().max(), "completions_clipped_ratio": truncated,
            "samples_consumed": samples_consumed,
        })
    }

    /// Tokens the step's updates went through: every row's prompt and completion, once per
    /// update (`num_iterations`); for the throughput log only.
    pub fn trained_tokens(&self, cfg: &GrpoConfig) -> u64 {
        let r = &self.rollouts;
        let per_update: usize = r
            .requests
            .iter()
            .zip(&r.generations)
            .map(|(req, gen)| req.prompt_ids.len() + gen.tokens.len())
            .sum();
        (per_update * cfg.num_iterations) as u64
    }

    /// The mean reward of the step's completions.
    pub fn mean_reward(&self) -> f64 {
        self.scored.iter().map(|r| r.total).sum::<f64>() / self.scored.len() as f64
    }

    /// The mean of each named reward part (the parts of the first completion name them).
    fn mean_parts(&self) -> serde_json::Map<String, Value> {
        let n = self.scored.len() as f64;
        let mut parts = serde_json::Map::new();
        for name in self
            .scored
            .first()
            .map(|s| s.parts.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let m = self
                .scored
                .iter()
                .map(|s| s.parts.get(&name).copied().unwrap_or(0.0))
                .sum::<f64>()
                / n;
            parts.insert(name, json!(m));
        }
        parts
    }

    /// One line of the `rollouts` log per completion, in TRL's conversational
    /// prompt-completion form: `prompt` the messages answered, `completion` the answer as
    /// one assistant message.
    pub fn rollout_rows(&self, step: u64, prompts: &EncodedPrompts, g: usize) -> Vec<Value> {
        let r = &self.rollouts;
        r.generations
            .iter()
            .zip(&self.scored)
            .zip(&self.advantages.values)
            .enumerate()
            .map(|(i, ((gen, out), a))| {
                let (idx, epoch) = r.picked[i / g];
                json!({
                    "step": step, "prompt_index": idx, "epoch": epoch, "generation": i % g,
                    "prompt": prompts.messages[idx], "completion": [Message::assistant(&gen.text)], "reward": out.total, "parts": out.parts,
                    "details": out.details, "advantage": a, "completion_tokens": gen.tokens.len(),
                    "finish": format!("{:?}", gen.finish).to_lowercase(),
                })
            })
            .collect()
    }
}
