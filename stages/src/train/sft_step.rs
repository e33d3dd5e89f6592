//! One supervised optimizer step, with the optional regularisers toward the reference
//! policy (the base with the adapter off; the terms themselves live in [`super::regularise`]).
//! Shared by the `sft` kind and by the safety steps `rl` interleaves, so both train exactly
//! the same way.
//!
//! The step's loss, over its examples split into micro-batches of `micro_batch` rows:
//! - NLL: summed over every target token of the step, divided by the step's target-token
//!   count (transformers' loss with `num_items_in_batch`: every token weighs the same, and
//!   the result does not depend on the micro-batch split);
//! - `kl_lambda` x KL(policy || reference) over the full next-token distribution at each
//!   target position, normalised the same way;
//! - `ldifs.lambda` x LDIFS: for each chosen layer, the mean over real tokens and hidden
//!   units of (h - h_ref)^2, averaged over the layers and weighted by each micro-batch's
//!   share of the step's rows (the feature-space distance of Mukhoti et al., made
//!   independent of width and length so one lambda fits any model).

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use emflow_model::{accumulate, clip_grad_norm, token_logprobs, AdamW, TrainPass};
use serde::{Deserialize, Serialize};

use super::batch::{collate_sft, SftBatch, SftExample};
use super::policy::Policy;
use super::regularise::{kl_per_position, ldifs_distance, reference_forward, Ldifs};
use super::scalar;

/// LDIFS settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LdifsParams {
    /// Weight of the feature distance to the reference in the loss.
    pub lambda: f64,
    /// Use the output of every `every`-th decoder layer (1-based: 5 means layers 5, 10, ...).
    #[serde(default = "five")]
    pub every: usize,
}

fn five() -> usize {
    5
}

impl LdifsParams {
    /// 0-based indices of the layers compared, out of `num_layers`.
    pub fn layers(&self, num_layers: usize) -> Vec<usize> {
        let k = self.every.max(1);
        (1..=num_layers)
            .filter(|l| l % k == 0)
            .map(|l| l - 1)
            .collect()
    }
}

#[derive(Clone, Debug)]
pub struct SftStepConfig {
    pub micro_batch: usize,
    pub kl_lambda: f64,
    pub ldifs: Option<LdifsParams>,
    pub max_grad_norm: f64,
    /// Recompute activations layer by layer in the backward pass (less memory, the same
    /// gradients within f32 rounding).
    pub gradient_checkpointing: bool,
}

/// What one step measured.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SftStepStats {
    /// Mean NLL per target token (the loss without regularisers).
    pub nll: f64,
    pub kl: Option<f64>,
    pub ldifs: Option<f64>,
    /// The optimised total.
    pub loss: f64,
    pub grad_norm: f64,
    pub target_tokens: usize,
    pub tokens: usize,
}

/// Runs one optimizer step on `examples` at learning rate `lr`: the summed loss of its
/// micro-batches ([`micro_batch_loss`]), one backward pass each, then clip and update.
pub fn sft_step(
    policy: &mut Policy,
    examples: &[SftExample],
    cfg: &SftStepConfig,
    opt: &mut AdamW,
    lr: f64,
) -> Result<SftStepStats> {
    let shape = StepShape::new(policy, examples, cfg)?;
    let mut grads = None;
    let mut stats = SftStepStats {
        target_tokens: shape.target_tokens,
        ..Default::default()
    };
    let (mut kl_sum, mut ldifs_sum) = (0.0, 0.0);
    for chunk in examples.chunks(cfg.micro_batch) {
        stats.tokens += chunk.iter().map(|e| e.ids.len()).sum::<usize>();
        let share = chunk.len() as f64 / examples.len() as f64;
        let (loss, terms, g) = micro_batch_backward(policy, chunk, share, &shape, cfg)?;
        stats.nll += terms.nll;
        kl_sum += terms.kl;
        ldifs_sum += terms.ldifs;
        stats.loss += loss;
        accumulate(&mut grads, &policy.vars, g, 1.0)?;
    }
    let mut grads = grads.context("no gradients were produced")?;
    stats.grad_norm = clip_grad_norm(&policy.vars, &mut grads, cfg.max_grad_norm)?;
    opt.step(&grads, lr)?;
    if cfg.kl_lambda != 0.0 {
        stats.kl = Some(kl_sum);
    }
    if shape.ldifs.is_on() {
        stats.ldifs = Some(ldifs_sum);
    }
    Ok(stats)
}

/// What every micro-batch of a step shares: the normaliser and the reference's use.
struct StepShape {
    /// Target tokens of the whole step: every token weighs the same.
    target_tokens: usize,
    /// Whether the reference pass runs (a KL or LDIFS weight is set).
    needs_ref: bool,
    ldifs: Ldifs,
}

impl StepShape {
    fn new(policy: &Policy, examples: &[SftExample], cfg: &SftStepConfig) -> Result<Self> {
        ensure!(
            !examples.is_empty(),
            "an SFT step needs at least one example"
        );
        ensure!(cfg.micro_batch >= 1, "micro-batch size must be at least 1");
        let needs_ref = cfg.kl_lambda != 0.0 || cfg.ldifs.as_ref().is_some_and(|l| l.lambda != 0.0);
        ensure!(
            !needs_ref || policy.has_reference(),
            "KL and LDIFS compare against the base model with the adapter switched off; they need LoRA, not full fine-tuning"
        );
        let target_tokens: usize = examples.iter().map(SftExample::target_tokens).sum();
        ensure!(
            target_tokens > 0,
            "no example of this step has a trainable (assistant) token"
        );
        let num_layers = policy.lm.config.num_layers;
        Ok(StepShape {
            target_tokens,
            needs_ref,
            ldifs: Ldifs::new(cfg.ldifs.as_ref().map(|l| (l.lambda, l.layers(num_layers)))),
        })
    }
}

/// One micro-batch's contributions to the step's logged figures.
struct Terms {
    nll: f64,
    kl: f64,
    ldifs: f64,
}

/// The loss of one micro-batch (`share` of the step's rows), its logged terms and its
/// gradients: NLL over its target tokens plus the KL and LDIFS terms toward the reference,
/// each normalised by the whole step; with `cfg.gradient_checkpointing`, activations are
/// recomputed layer by layer in the backward pass (`Transformer::train_backward`).
fn micro_batch_backward(
    policy: &mut Policy,
    chunk: &[SftExample],
    share: f64,
    shape: &StepShape,
    cfg: &SftStepConfig,
) -> Result<(f64, Terms, GradStore)> {
    let device = policy.lm.model.device().clone();
    let batch = collate_sft(chunk, policy.lm.tokenizer.pad_id(), &device)?;
    let t = batch.ids.dim(1)?;
    // Reference pass first (adapter off; no vars involved, so no graph is built).
    let (ref_logits, ref_hidden) = if shape.needs_ref {
        let (logits, hidden) =
            reference_forward(policy, &batch.ids, &batch.attention, &shape.ldifs.layers)?;
        let kl_logits = if cfg.kl_lambda != 0.0 {
            Some(logits.narrow(1, 0, t - 1)?.contiguous()?.detach())
        } else {
            None
        };
        (kl_logits, hidden)
    } else {
        (None, Vec::new())
    };
    let reference = Reference {
        logits: ref_logits,
        hidden: ref_hidden,
    };
    let mut terms = Terms {
        nll: 0.0,
        kl: 0.0,
        ldifs: 0.0,
    };
    let hidden_size = policy.lm.config.hidden_size;
    let (loss, grads) = policy.lm.model.train_backward(
        &batch.ids,
        &batch.attention,
        &shape.ldifs.layers,
        cfg.gradient_checkpointing,
        |pass| {
            let parts = LossParts {
                batch: &batch,
                reference: &reference,
                share,
                hidden_size,
            };
            micro_batch_loss(pass, &parts, shape, cfg, &mut terms)
        },
    )?;
    Ok((scalar(&loss)?, terms, grads))
}

/// The reference policy's outputs a micro-batch's regularisers compare against.
struct Reference {
    /// Logits at the target positions, when the KL term is on.
    logits: Option<Tensor>,
    /// The compared layers' outputs, when LDIFS is on.
    hidden: Vec<Tensor>,
}

/// What [`micro_batch_loss`] reads besides the policy's pass.
struct LossParts<'a> {
    batch: &'a SftBatch,
    reference: &'a Reference,
    share: f64,
    hidden_size: usize,
}

/// The micro-batch's loss from the policy's pass; fills `terms`.
fn micro_batch_loss(
    pass: &TrainPass,
    parts: &LossParts,
    shape: &StepShape,
    cfg: &SftStepConfig,
    terms: &mut Terms,
) -> Result<Tensor> {
    let (batch, denom) = (parts.batch, shape.target_tokens as f64);
    let (logps, logits) = policy_scores(pass, batch, parts.reference.logits.is_some())?;
    let nll_sum = (logps * &batch.loss_mask)?.sum_all()?.neg()?;
    terms.nll = scalar(&nll_sum)? / denom;
    let mut loss = (nll_sum / denom)?;
    if let (Some(ref_logits), Some(logits)) = (&parts.reference.logits, logits) {
        let kl = (kl_per_position(&logits, ref_logits)? * &batch.loss_mask)?.sum_all()?;
        terms.kl = scalar(&kl)? / denom;
        loss = (loss + (kl * (cfg.kl_lambda / denom))?)?;
    }
    if let Some(dist) = ldifs_distance(
        pass.hidden(),
        &parts.reference.hidden,
        &batch.attention,
        parts.hidden_size,
    )? {
        terms.ldifs = scalar(&dist)? * parts.share;
        loss = (loss + (dist * (shape.ldifs.lambda * parts.share))?)?;
    }
    Ok(loss)
}

/// The policy's target log-probs and, when the KL term needs whole distributions, its
/// logits at the target positions (otherwise the pass scores the targets without building
/// them).
fn policy_scores(
    pass: &TrainPass,
    batch: &SftBatch,
    with_logits: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let t = batch.ids.dim(1)?;
    if with_logits {
        let logits = pass.logits()?.narrow(1, 0, t - 1)?.contiguous()?;
        Ok((token_logprobs(&logits, &batch.targets, 1.0)?, Some(logits)))
    } else {
        let scores = pass.scores((0, t - 1), &batch.targets, 1.0)?;
        Ok((scores.logprobs, None))
    }
}

/// Mean log-probability per target token of `examples` under the current policy, without
/// a graph: the held-out measure of what SFT taught.
pub fn mean_target_logprob(
    policy: &Policy,
    examples: &[SftExample],
    micro_batch: usize,
) -> Result<f64> {
    let device = policy.lm.model.device().clone();
    let pad = policy.lm.tokenizer.pad_id();
    let (mut sum, mut count) = (0.0, 0.0);
    for chunk in examples.chunks(micro_batch.max(1)) {
        let batch = collate_sft(chunk, pad, &device)?;
        let t = batch.ids.dim(1)?;
        let logits = policy
            .lm
            .model
            .forward_eval(&batch.ids, &batch.attention)?
            .narrow(1, 0, t - 1)?
            .contiguous()?;
        let logps = token_logprobs(&logits, &batch.targets, 1.0)?;
        sum += scalar(&(logps * &batch.loss_mask)?.sum_all()?)?;
        count += scalar(&batch.loss_mask.sum_all()?)?;
    }
    ensure!(count > 0.0, "no target tokens to score");
    Ok(sum / count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldifs_layers_are_every_kth() {
        let l = LdifsParams {
            lambda: 1.0,
            every: 5,
        };
        assert_eq!(l.layers(30), vec![4, 9, 14, 19, 24, 29]);
        assert_eq!(
            LdifsParams {
                lambda: 1.0,
                every: 1
            }
            .layers(2),
            vec![0, 1]
        );
    }
}
