//! The regularisers that hold a fine-tuned policy near its reference (the same base with the
//! adapter switched off), shared by the SFT step ([`super::sft_step`]) and the GRPO step
//! ([`super::grpo_step`]):
//! - KL to the reference: [`kl_per_position`], the full next-token distribution's
//!   KL(policy || reference), is SFT's `kl_lambda` term; [`k3_kl`], TRL's per-token
//!   estimator from sampled tokens' log-probs, is GRPO's `beta` term;
//! - LDIFS ([`Ldifs`]): for each compared layer, the mean over real tokens and hidden units of
//!   (h - h_ref)^2, averaged over the layers (the feature-space distance of Mukhoti et al.,
//!   made independent of width and length so one lambda fits any model). Each step weighs it
//!   as its own loss is weighed (SFT by a micro-batch's share of rows, GRPO per micro-batch).
//!
//! [`reference_forward`] is the reference pass both steps make: adapter off, no graph.

use anyhow::{ensure, Context, Result};
use candle_core::{Tensor, D};

use super::policy::Policy;
use super::scalar;

/// Full-distribution KL(p || q) per position from logits (b, t, v) -> (b, t).
pub fn kl_per_position(policy_logits: &Tensor, ref_logits: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(policy_logits, D::Minus1)?;
    let logq = candle_nn::ops::log_softmax(ref_logits, D::Minus1)?;
    Ok((logp.exp()? * (&logp - logq)?)?.sum(D::Minus1)?)
}

/// The k3 estimator of KL(policy || reference) per token: `exp(ref - pol) - (ref - pol) - 1`.
/// Non-negative, zero where the two agree; differentiable in `policy_logps`.
pub fn k3_kl(ref_logps: &Tensor, policy_logps: &Tensor) -> Result<Tensor> {
    let d = (ref_logps - policy_logps)?;
    Ok(((d.exp()? - &d)? - 1.0)?)
}

/// LDIFS as a step applies it: the weight and the 0-based decoder layers compared. Off (no
/// layers, so no reference features are computed) when not configured or `lambda` is 0.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ldifs {
    pub lambda: f64,
    pub layers: Vec<usize>,
}

impl Ldifs {
    /// From a stage's `(lambda, layers)` setting, if it has one.
    pub fn new(setting: Option<(f64, Vec<usize>)>) -> Self {
        match setting {
            Some((lambda, layers)) if lambda != 0.0 => Ldifs { lambda, layers },
            Some((lambda, _)) => Ldifs {
                lambda,
                layers: Vec::new(),
            },
            None => Ldifs::default(),
        }
    }

    pub fn is_on(&self) -> bool {
        !self.layers.is_empty()
    }
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

/// The reference's full-sequence logits and the outputs of decoder `layers`, adapter off.
/// Only frozen weights take part, so no graph is built; the features come back detached.
pub fn reference_forward(
    policy: &mut Policy,
    ids: &Tensor,
    attention: &Tensor,
    layers: &[usize],
) -> Result<(Tensor, Vec<Tensor>)> {
    let out = policy.with_adapter_off(|reference| {
        reference
            .lm
            .model
            .forward_train_hidden(ids, attention, layers)
    });
    let (logits, hidden) = out.context("reference forward pass")?;
    Ok((logits, hidden.into_iter().map(|h| h.detach()).collect()))
}
