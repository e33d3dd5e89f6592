//! The forward passes: train mode (differentiable, full sequences or scored positions) and
//! eval mode (fused kernels, no graph, optionally appending to a KV cache), and the positions
//! and additive mask every pass lays its batch out with.
//!
//! * [`Mode::Train`]: only ops with a backward, trainable weights as tracked `Var`s,
//!   full-sequence logits. On the CPU in f32 the norm, RoPE, attention probabilities, SwiGLU
//!   and each frozen or adapted projection are one hand-written node each (candle's backward
//!   costs a zero-filled tensor and a sum per graph edge); elsewhere they are candle ops
//!   (`rms_norm_slow`, a RoPE spelled with products, `softmax`).
//! * [`Mode::Eval`]: fused kernels, every weight detached (no graph is built), and an optional
//!   preallocated KV cache for generation and scoring.
//!
//! Batches may be padded on either side: every row gets its own position ids (its count of real
//! tokens so far) and an additive mask (causal plus key padding).

use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};

use super::kv_cache::KvCache;
use super::layers::rms_norm;
use super::model::Transformer;
use super::pass::Ctx;
use super::weight::{Mode, Weight};
use crate::losses::token_logprobs;
use crate::ops::train::head_logprobs;

/// What [`Transformer::forward_train_scores`] returns.
pub struct PositionScores {
    /// `log p(target)` at each scored position, (b, len); differentiable.
    pub logprobs: Tensor,
    /// Entropy of each scored position's next-token distribution at the same temperature,
    /// (b, len); detached.
    pub entropy: Tensor,
    /// The outputs of the requested decoder layers, each (b, t, hidden).
    pub hidden: Vec<Tensor>,
}

/// What a training loss is built from: one differentiable pass's final-norm hidden states and
/// the outputs of the decoder layers it was asked for. Made by the `forward_train*` functions
/// and handed to the loss of [`Transformer::train_backward`], with or without checkpointing.
pub struct TrainPass<'a> {
    pub(super) model: &'a Transformer,
    /// (b, t, hidden), after the final norm.
    pub(super) normed: Tensor,
    /// The outputs of the requested decoder layers, in layer order, each (b, t, hidden).
    pub(super) hidden: Vec<Tensor>,
}

impl TrainPass<'_> {
    /// f32 logits (b, t, vocab) at every position.
    pub fn logits(&self) -> Result<Tensor> {
        self.model.logits(&self.normed, Mode::Train)
    }

    /// Logits only for positions `from..from + len` (b, len, vocab): GRPO needs them only
    /// where they predict completion tokens, and the output projection with its backward is a
    /// fifth of a SmolLM2 step per position. (Slicing full logits instead would also cost a
    /// vocabulary-sized zero-filled gradient.)
    pub fn logits_range(&self, from: usize, len: usize) -> Result<Tensor> {
        let t = self.normed.dim(1)?;
        if len == 0 || from + len > t {
            bail!(
                "logits requested for positions {from}..{}, but the sequences have {t}",
                from + len
            );
        }
        let h = self.normed.narrow(1, from, len)?.contiguous()?;
        self.model.logits(&h, Mode::Train)
    }

    /// The outputs of the requested decoder layers (0-based; transformers'
    /// `hidden_states[i + 1]`), in layer order.
    pub fn hidden(&self) -> &[Tensor] {
        &self.hidden
    }

    /// Scores at positions `from..from + len` only: the log-probability of `targets` (b, len)
    /// at each, at `temperature`, with each position's entropy (and the pass's layer outputs).
    /// With a frozen output projection on the CPU in f32 no logits tensor is ever built (see
    /// `head_logprobs`), elsewhere it is the logits and [`token_logprobs`].
    pub fn scores(
        &self,
        (from, len): (usize, usize),
        targets: &Tensor,
        temperature: f64,
    ) -> Result<PositionScores> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            bail!("temperature must be a positive number, got {temperature}");
        }
        let (b, t, _) = self.normed.dims3()?;
        if len == 0 || from + len > t {
            bail!(
                "scores requested for positions {from}..{}, but the sequences have {t}",
                from + len
            );
        }
        if targets.dims() != [b, len] {
            bail!(
                "{:?} targets for {b} sequences scored at {len} positions",
                targets.dims()
            );
        }
        let h = if from == 0 && len == t {
            self.normed.clone()
        } else {
            self.normed.narrow(1, from, len)?.contiguous()?
        };
        let (logprobs, entropy) = self.model.head_scores(&h, targets, temperature)?;
        Ok(PositionScores {
            logprobs,
            entropy,
            hidden: self.hidden.clone(),
        })
    }
}

impl Transformer {
    /// Differentiable full-sequence forward: `ids` (b, t) u32, `attention_mask` (b, t) with 1 on
    /// real tokens (left or right padding). Returns f32 logits (b, t, vocab).
    pub fn forward_train(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.train_pass(ids, attention_mask, &[])?.logits()
    }

    /// [`Self::forward_train`], also returning the output of each listed decoder layer
    /// (0-based; transformers' `hidden_states[i + 1]`), each (b, t, hidden).
    pub fn forward_train_hidden(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let pass = self.train_pass(ids, attention_mask, layers)?;
        Ok((pass.logits()?, pass.hidden))
    }

    /// [`TrainPass::logits_range`] of a differentiable pass, with the listed layers' outputs.
    pub fn forward_train_hidden_range(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
        from: usize,
        len: usize,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let pass = self.train_pass(ids, attention_mask, layers)?;
        Ok((pass.logits_range(from, len)?, pass.hidden))
    }

    /// [`TrainPass::scores`] of a differentiable pass over the listed `layers`. This is what
    /// SFT and GRPO train on.
    pub fn forward_train_scores(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
        positions: (usize, usize),
        targets: &Tensor,
        temperature: f64,
    ) -> Result<PositionScores> {
        self.train_pass(ids, attention_mask, layers)?
            .scores(positions, targets, temperature)
    }

    /// A differentiable pass through every layer with the whole graph kept (see
    /// `checkpoint` for the pass that keeps only each layer's input).
    pub(super) fn train_pass(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
    ) -> Result<TrainPass<'_>> {
        let rows = mask_rows(attention_mask)?;
        let (normed, hidden) = self.run(ids, &rows, Mode::Train, None, layers)?;
        Ok(TrainPass {
            model: self,
            normed,
            hidden,
        })
    }
    /// Log-probabilities of `targets` under the logits of `h` at `temperature`, and each
    /// position's entropy (detached).
    fn head_scores(
        &self,
        h: &Tensor,
        targets: &Tensor,
        temperature: f64,
    ) -> Result<(Tensor, Tensor)> {
        let fused = h.device().is_cpu() && self.dtype == DType::F32;
        if let (Some(w), true) = (self.frozen_head()?, fused) {
            let targets = targets.to_dtype(DType::U32)?;
            // A tied frozen embedding is the head's transpose, stored row-major.
            let w_rows = match (&self.lm_head_t, &self.embed) {
                (None, Weight::Frozen(e)) => Some(e),
                _ => None,
            };
            let s = head_logprobs(h, (&w, w_rows), &targets, temperature)?;
            return Ok((s.logprobs, s.entropy));
        }
        let logits = self.logits(h, Mode::Train)?;
        let logprobs = token_logprobs(&logits, targets, temperature)?;
        let z = (logits.detach() / temperature)?;
        let logp_all = candle_nn::ops::log_softmax(&z, D::Minus1)?;
        let entropy = (logp_all.exp()? * &logp_all)?.sum(D::Minus1)?.neg()?;
        Ok((logprobs, entropy))
    }

    /// The output projection as (hidden, vocab) when it is frozen (a frozen head, or the tied
    /// embedding while the embedding is frozen).
    fn frozen_head(&self) -> Result<Option<Tensor>> {
        Ok(match (&self.lm_head_t, &self.embed_t) {
            (Some(head @ Weight::Frozen(_)), _) => Some(head.get(Mode::Train, self.dtype)?),
            (None, Some(embed_t)) => Some(embed_t.clone()),
            _ => None,
        })
    }

    /// Fused-kernel forward without a graph: f32 logits (b, t, vocab).
    pub fn forward_eval(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let rows = mask_rows(attention_mask)?;
        let (h, _) = self.run(ids, &rows, Mode::Eval, None, &[])?;
        self.logits(&h, Mode::Eval)
    }

    /// The outputs of the listed decoder layers (0-based; transformers' `hidden_states[i + 1]`),
    /// each (b, t, hidden), from a fused-kernel pass without a graph (and so without
    /// steering): what the `persona_vector` kind averages.
    pub fn forward_eval_hidden(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
    ) -> Result<Vec<Tensor>> {
        let rows = mask_rows(attention_mask)?;
        Ok(self.run(ids, &rows, Mode::Eval, None, layers)?.1)
    }

    /// Final-norm hidden states (b, t, hidden) in eval mode, appending to `cache` when given.
    /// `key_valid` rows cover the cached slots plus the `t` new ones.
    pub(crate) fn hidden_eval(
        &self,
        ids: &Tensor,
        key_valid: &[Vec<bool>],
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        Ok(self.run(ids, key_valid, Mode::Eval, cache, &[])?.0)
    }
    fn run(
        &self,
        ids: &Tensor,
        key_valid: &[Vec<bool>],
        mode: Mode,
        cache: Option<&mut KvCache>,
        capture: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let past = cache.as_ref().map_or(0, |c| c.len);
        let (positions, mask) = self.lay_out(ids, key_valid, past)?;
        self.run_laid_out(ids, positions, mask, mode, cache, capture)
    }

    /// Positions and additive mask of `ids` (b, t) after `past` cached slots, whose rows of
    /// `key_valid` must cover `past + t` slots.
    fn lay_out(
        &self,
        ids: &Tensor,
        key_valid: &[Vec<bool>],
        past: usize,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let (b, t) = ids
            .dims2()
            .context("token ids must be a (batch, seq) tensor")?;
        if key_valid.len() != b || key_valid.iter().any(|r| r.len() != past + t) {
            bail!(
                "attention mask shape does not match ids: {} rows for batch {b}, expected {} slots each",
                key_valid.len(),
                past + t
            );
        }
        Ok(positions_and_mask(key_valid, past, t))
    }

    /// Final-norm hidden states (1, t, hidden) in eval mode for `ids` appended to a one-row
    /// `cache`, with each new token's position and additive mask row over all `cache.len + t`
    /// slots given explicitly, so a caller can lay a token tree out after a cached prompt
    /// (each node seeing the prompt, its ancestors and itself; see `score_candidates`).
    pub(crate) fn hidden_eval_laid_out(
        &self,
        ids: &[u32],
        positions: Vec<u32>,
        mask: Vec<f32>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = ids.len();
        if positions.len() != t || mask.len() != t * (cache.len + t) {
            bail!(
                "internal: {t} tokens laid out with {} positions and {} mask entries",
                positions.len(),
                mask.len()
            );
        }
        let ids = Tensor::from_vec(ids.to_vec(), (1, t), &self.device)?;
        Ok(self
            .run_laid_out(&ids, positions, mask, Mode::Eval, Some(cache), &[])?
            .0)
    }

    /// The layer stack for `ids` (b, t) with per-token `positions` (b * t) and an additive
    /// `mask` (b, t, past + t).
    fn run_laid_out(
        &self,
        ids: &Tensor,
        positions: Vec<u32>,
        mask: Vec<f32>,
        mode: Mode,
        mut cache: Option<&mut KvCache>,
        capture: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let t = ids.dim(1)?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        let cx = self.pass_context(ids, positions, mask, mode, past)?;
        let mut x = self.embed_tokens(ids, mode)?;
        let mut captured = Vec::with_capacity(capture.len());
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&self.cfg, i, &x, &cx, cache.as_deref_mut())?;
            x = self.steer(i, x, mode)?;
            if capture.contains(&i) {
                captured.push(x.clone());
            }
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.check_captured(capture, captured.len())?;
        let x = rms_norm(&x, &self.final_norm, &cx, self.cfg.rms_eps)?;
        Ok((x, captured))
    }

    /// An error unless every layer in `capture` was captured (`count` were).
    pub(super) fn check_captured(&self, capture: &[usize], count: usize) -> Result<()> {
        if count != capture.len() {
            bail!(
                "hidden states requested for layers {capture:?}, but the model has {} layers",
                self.layers.len()
            );
        }
        Ok(())
    }

    /// The context every layer of one pass shares, for `ids` (b, t) at `positions` (b * t)
    /// with the additive `mask` (b, t, past + t).
    fn pass_context(
        &self,
        ids: &Tensor,
        positions: Vec<u32>,
        mask: Vec<f32>,
        mode: Mode,
        past: usize,
    ) -> Result<Ctx<'_>> {
        let (b, t) = ids.dims2()?;
        if let Some(max) = positions.iter().max() {
            if *max as usize >= self.cos.dim(0)? {
                bail!(
                    "sequence position {max} exceeds the {} positions this model supports",
                    self.cos.dim(0)?
                );
            }
        }
        let half = self.cfg.head_dim / 2;
        let pos = Tensor::from_vec(positions, b * t, &self.device)?;
        let table = |full: &Tensor| -> Result<Tensor> {
            Ok(full
                .index_select(&pos, 0)?
                .reshape((b, t, half))?
                .to_dtype(self.dtype)?)
        };
        Ok(Ctx {
            mode,
            dtype: self.dtype,
            lora_enabled: self.lora_enabled,
            cos: table(&self.cos)?,
            sin: table(&self.sin)?,
            mask: Tensor::from_vec(mask, (b, 1, 1, t, past + t), &self.device)?,
            attention_tables: OnceLock::new(),
            dropout: Some(&self.dropout_rng),
        })
    }

    /// The embeddings of `ids` (b, t): (b, t, hidden).
    pub(super) fn embed_tokens(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let embed = self.embed.get(mode, self.dtype)?;
        Ok(embed
            .index_select(&ids.flatten_all()?.to_dtype(DType::U32)?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// The context of a training pass over `ids` with the padding `attention_mask` (what
    /// `run` lays out for [`Mode::Train`] without a cache).
    pub(super) fn train_context(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Ctx<'_>> {
        let rows = mask_rows(attention_mask)?;
        let (positions, mask) = self.lay_out(ids, &rows, 0)?;
        self.pass_context(ids, positions, mask, Mode::Train, 0)
    }
}

/// Rows of a padding mask as booleans (1 = real token).
fn mask_rows(mask: &Tensor) -> Result<Vec<Vec<bool>>> {
    let rows = mask
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()
        .context("attention_mask must be a (batch, seq) tensor")?;
    Ok(rows
        .into_iter()
        .map(|r| r.into_iter().map(|v| v != 0.0).collect())
        .collect())
}

/// Position ids and the additive attention mask for `t` new tokens per row appended after
/// `past` cached slots. `key_valid[row]` covers all `past + t` slots. A query sees keys at or
/// before its own slot that are real tokens; a padding query also sees itself, so its softmax
/// row is never empty (its output is ignored, but must not be NaN).
pub(crate) fn positions_and_mask(
    key_valid: &[Vec<bool>],
    past: usize,
    t: usize,
) -> (Vec<u32>, Vec<f32>) {
    let b = key_valid.len();
    let kv = past + t;
    let mut positions = Vec::with_capacity(b * t);
    let mut mask = vec![f32::NEG_INFINITY; b * t * kv];
    for (row, valid) in key_valid.iter().enumerate() {
        let mut seen = valid[..past].iter().filter(|v| **v).count() as u32;
        for i in 0..t {
            let slot = past + i;
            positions.push(seen.saturating_sub(if valid[slot] { 0 } else { 1 }));
            if valid[slot] {
                seen += 1;
            }
            let base = (row * t + i) * kv;
            for (j, ok) in valid[..=slot].iter().enumerate() {
                if *ok || j == slot {
                    mask[base + j] = 0.0;
                }
            }
        }
    }
    (positions, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_positions_start_at_zero_and_mask_is_causal() {
        let valid = vec![vec![false, true, true], vec![true, true, true]];
        let (pos, mask) = positions_and_mask(&valid, 0, 3);
        assert_eq!(pos, vec![0, 0, 1, 0, 1, 2]);
        let inf = f32::NEG_INFINITY;
        // Row 0: the pad query sees itself; real queries skip the pad key.
        assert_eq!(&mask[0..9], &[0.0, inf, inf, inf, 0.0, inf, inf, 0.0, 0.0]);
        assert_eq!(&mask[9..18], &[0.0, inf, inf, 0.0, 0.0, inf, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn cached_step_continues_positions() {
        let valid = vec![vec![false, true, true, true]];
        let (pos, mask) = positions_and_mask(&valid, 3, 1);
        assert_eq!(pos, vec![2]);
        assert_eq!(mask, vec![f32::NEG_INFINITY, 0.0, 0.0, 0.0]);
    }
}
