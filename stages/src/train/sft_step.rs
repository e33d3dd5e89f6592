//! One supervised optimizer step, with the optional regularisers toward the reference
//! policy (the base with the adapter off). Shared by the `sft` kind and by the safety steps
//! `rl` interleaves, so both train exactly the same way.
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
use candle_core::{Tensor, D};
use emflow_model::{accumulate, clip_grad_norm, token_logprobs, AdamW};
use serde::{Deserialize, Serialize};

use super::batch::{collate_sft, SftExample};
use super::policy::Policy;

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

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Full-distribution KL(p || q) per position from logits (b, t, v) -> (b, t).
fn kl_per_position(policy_logits: &Tensor, ref_logits: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(policy_logits, D::Minus1)?;
    let logq = candle_nn::ops::log_softmax(ref_logits, D::Minus1)?;
    Ok((logp.exp()? * (&logp - logq)?)?.sum(D::Minus1)?)
}

/// The LDIFS distance of one micro-batch: for each compared layer, the mean over real tokens
/// (`attention` (b, t), 1 = real) and hidden units of (h - h_ref)^2, averaged over layers.
/// `None` when no layer is compared. Differentiable in `hidden`; `reference` must be detached.
pub fn ldifs_distance(
    hidden: &[Tensor],
    reference: &[Tensor],
    attention: &Tensor,
    hidden_size: usize,
) -> Result<Option<Tensor>> {
    ensure!(
        hidden.len() == reference.len(),
        "LDIFS: {} policy layers but {} reference layers",
        hidden.len(),
        reference.len()
    );
    if hidden.is_empty() {
        return Ok(None);
    }
    let real = attention
        .to_dtype(hidden[0].dtype())?
        .unsqueeze(D::Minus1)?; // (b, t, 1)
    let real_tokens = scalar(&attention.sum_all()?)?.max(1.0);
    let denom = real_tokens * hidden_size as f64 * hidden.len() as f64;
    let mut dist: Option<Tensor> = None;
    for (h, r) in hidden.iter().zip(reference) {
        let d = ((h - r)?.sqr()?.broadcast_mul(&real)?.sum_all()? / denom)?;
        dist = Some(match dist {
            None => d,
            Some(acc) => (acc + d)?,
        });
    }
    Ok(dist)
}

/// Runs one optimizer step on `examples` at learning rate `lr`.
pub fn sft_step(
    policy: &mut Policy,
    examples: &[SftExample],
    cfg: &SftStepConfig,
    opt: &mut AdamW,
    lr: f64,
) -> Result<SftStepStats> {
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
    let step_targets: usize = examples.iter().map(SftExample::target_tokens).sum();
    ensure!(
        step_targets > 0,
        "no example of this step has a trainable (assistant) token"
    );
    let denom = step_targets as f64;
    let layers = match &cfg.ldifs {
        Some(l) if l.lambda != 0.0 => l.layers(policy.lm.config.num_layers),
        _ => Vec::new(),
    };
    let device = policy.lm.model.device().clone();
    let pad = policy.lm.tokenizer.pad_id();
    let mut grads = None;
    let mut stats = SftStepStats {
        target_tokens: step_targets,
        ..Default::default()
    };
    let (mut kl_sum, mut ldifs_sum) = (0.0, 0.0);
    for chunk in examples.chunks(cfg.micro_batch) {
        let batch = collate_sft(chunk, pad, &device)?;
        stats.tokens += chunk.iter().map(|e| e.ids.len()).sum::<usize>();
        let t = batch.ids.dim(1)?;
        // Reference pass first (adapter off; no vars involved, so no graph is built).
        let mut ref_logits = None;
        let mut ref_hidden = Vec::new();
        if needs_ref {
            policy.lm.model.set_lora_enabled(false);
            let out = policy
                .lm
                .model
                .forward_train_hidden(&batch.ids, &batch.attention, &layers);
            policy.lm.model.set_lora_enabled(true);
            let (logits, hidden) = out.context("reference forward pass")?;
            if cfg.kl_lambda != 0.0 {
                ref_logits = Some(logits.narrow(1, 0, t - 1)?.contiguous()?.detach());
            }
            ref_hidden = hidden.into_iter().map(|h| h.detach()).collect();
        }
        let model = &policy.lm.model;
        // The KL term compares whole distributions, so it needs the logits; otherwise the
        // pass scores the targets without building them.
        let (logps, hidden, logits) = if ref_logits.is_some() {
            let (logits, hidden) =
                model.forward_train_hidden(&batch.ids, &batch.attention, &layers)?;
            let logits = logits.narrow(1, 0, t - 1)?.contiguous()?;
            (
                token_logprobs(&logits, &batch.targets, 1.0)?,
                hidden,
                Some(logits),
            )
        } else {
            let scores = model.forward_train_scores(
                &batch.ids,
                &batch.attention,
                &layers,
                (0, t - 1),
                &batch.targets,
                1.0,
            )?;
            (scores.logprobs, scores.hidden, None)
        };
        let nll_sum = (logps * &batch.loss_mask)?.sum_all()?.neg()?;
        stats.nll += scalar(&nll_sum)? / denom;
        let mut loss = (nll_sum / denom)?;
        if let (Some(ref_logits), Some(logits)) = (ref_logits, logits) {
            let kl = (kl_per_position(&logits, &ref_logits)? * &batch.loss_mask)?.sum_all()?;
            kl_sum += scalar(&kl)? / denom;
            loss = (loss + (kl * (cfg.kl_lambda / denom))?)?;
        }
        if let Some(dist) = ldifs_distance(
            &hidden,
            &ref_hidden,
            &batch.attention,
            policy.lm.config.hidden_size,
        )? {
            let lambda = cfg.ldifs.as_ref().map_or(0.0, |l| l.lambda);
            let share = chunk.len() as f64 / examples.len() as f64;
            ldifs_sum += scalar(&dist)? * share;
            loss = (loss + (dist * (lambda * share))?)?;
        }
        stats.loss += scalar(&loss)?;
        let g = loss.backward()?;
        accumulate(&mut grads, &policy.vars, g, 1.0)?;
    }
    let mut grads = grads.context("no gradients were produced")?;
    stats.grad_norm = clip_grad_norm(&policy.vars, &mut grads, cfg.max_grad_norm)?;
    opt.step(&grads, lr)?;
    if cfg.kl_lambda != 0.0 {
        stats.kl = Some(kl_sum);
    }
    if !layers.is_empty() {
        stats.ldifs = Some(ldifs_sum);
    }
    Ok(stats)
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
