//! The output projection and the target tokens' log-probabilities as one CPU op, with no
//! vocabulary-sized tensor in the graph.
//!
//! Training needs only `log p(target)` at each position, a scalar per row, but the logits
//! behind it are (rows, vocabulary): 100 MB for a 4 x 128-token SmolLM2 batch. Through the
//! graph they were allocated, read by the log-probability op, and in the backward pass met a
//! zero-filled gradient, an accumulating sum and the product back to the hidden states. Since
//! each row's output is a scalar, its gradient with respect to the row's hidden state is a
//! fixed vector times the upstream scalar: `((onehot(target) - softmax(z/T)) / T) Wᵀ`. This
//! op computes the logits a block of rows at a time, turns each block into that gradient in
//! place and multiplies it back at once, keeping only (rows, hidden) values for the backward
//! pass, which is then a per-row scaling. The same multiply-adds as before, none of the
//! traffic. The entropy of each row's distribution comes from the same pass.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{Forward, Grad1};
use crate::ops::cpu::{f32_slice, with_f32};
use crate::ops::cpu::{gemm_into, matrix, MatRef};
use crate::ops::cpu::{row_sums, RowSums};

/// Rows projected to the vocabulary at a time (SmolLM2: 25 MB of logits).
const BLOCK_ROWS: usize = 128;

pub(crate) struct HeadLogprobs {
    /// The frozen output projection, (hidden, vocab), any strides.
    w: Tensor,
    /// The same matrix transposed, (vocab, hidden), when the model holds it (a tied
    /// embedding): the gradient's product then reads it row by row, at twice the speed of
    /// a transposed view of `w` (92 against 46 GFLOPS for 128 SmolLM2 rows).
    w_rows: Option<Tensor>,
    targets: Vec<u32>,
    temperature: f32,
    /// Whether to keep each row's gradient for a backward pass.
    keep_gradient: bool,
    state: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    /// d log p(target) / d hidden, (rows, hidden).
    gradient: Option<Vec<f32>>,
    entropy: Option<Vec<f32>>,
}

/// Per row of logits `z`: log p(target) and the entropy at temperature `1 / inv_t`; with
/// `gradient`, the row is overwritten by d log p(target) / dz = `(onehot(target) - p) / T`.
/// One exponential per entry, kept in place for the gradient; the sums are `row_stats`'s
/// (see `softmax_rows`), so log-probabilities agree with `token_logprobs`.
fn score_row(row: &mut [f32], target: usize, inv_t: f32, gradient: bool) -> (f32, f32) {
    let z_target = row[target] * inv_t;
    let RowSums { max, sum, weighted } = row_sums(row, inv_t, gradient);
    let lse = max + sum.ln();
    if gradient {
        let scale = -inv_t / sum;
        for v in row.iter_mut() {
            *v *= scale;
        }
        row[target] += inv_t;
    }
    (z_target - lse, lse - weighted / sum)
}

/// The op as the graph holds it, shared with [`head_logprobs`], which reads the entropy back.
struct Shared(Arc<HeadLogprobs>);

impl CustomOp1 for Shared {
    fn name(&self) -> &'static str {
        "head_logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Forward {
        self.0.forward(s, l)
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Grad1 {
        self.0.backward(h, grad_res)
    }
}

impl HeadLogprobs {
    fn forward(&self, s: &CpuStorage, l: &Layout) -> Forward {
        let dims = l.shape().dims();
        let hidden = dims.last().copied().unwrap_or(0);
        let rows = l.shape().elem_count() / hidden.max(1);
        let h = f32_slice(s, l, "head_logprobs", "hidden states")?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(w_cpu) = &*w_storage else {
            return Err(candle_core::Error::Msg(
                "head_logprobs: the hidden states are on the CPU but the weight is not".into(),
            ));
        };
        let w = matrix(w_cpu, w_layout, "head_logprobs")?;
        let (w_rows, vocab) = w_layout.shape().dims2()?;
        if w_rows != hidden || rows != self.targets.len() {
            return Err(candle_core::Error::Msg(format!(
                "head_logprobs: hidden states {:?}, weight {:?} and {} targets do not fit",
                l.shape(),
                w_layout.shape(),
                self.targets.len()
            )));
        }
        if let Some(t) = self.targets.iter().find(|t| **t as usize >= vocab) {
            return Err(candle_core::Error::Msg(format!(
                "head_logprobs: target id {t} is outside the vocabulary of {vocab}"
            )));
        }
        let rows_guard = self.w_rows.as_ref().map(|t| t.storage_and_layout());
        let w_t = match &rows_guard {
            None => w.t(),
            Some((storage, layout)) => match &**storage {
                candle_core::Storage::Cpu(cpu) if layout.shape().dims2()? == (vocab, hidden) => {
                    matrix(cpu, layout, "head_logprobs")?
                }
                _ => {
                    return Err(candle_core::Error::Msg(
                        "head_logprobs: the transposed weight is not a (vocab, hidden) CPU matrix"
                            .into(),
                    ))
                }
            },
        };
        let inv_t = 1.0 / self.temperature;
        let mut logprobs = vec![0f32; rows];
        let mut entropy = vec![0f32; rows];
        let mut gradient = self.keep_gradient.then(|| vec![0f32; rows * hidden]);
        let mut logits = vec![0f32; BLOCK_ROWS.min(rows) * vocab];
        for first in (0..rows).step_by(BLOCK_ROWS) {
            let n = BLOCK_ROWS.min(rows - first);
            let block = &mut logits[..n * vocab];
            let h_block = MatRef::rows(&h[first * hidden..(first + n) * hidden], hidden);
            gemm_into(
                block,
                vocab,
                (n, vocab, hidden),
                (h_block, w),
                (false, 1.0),
                false,
            );
            block
                .par_chunks_mut(vocab)
                .zip(self.targets[first..first + n].par_iter())
                .zip(logprobs[first..first + n].par_iter_mut())
                .zip(entropy[first..first + n].par_iter_mut())
                .for_each(|(((row, &t), lp), ent)| {
                    (*lp, *ent) = score_row(row, t as usize, inv_t, self.keep_gradient);
                });
            if let Some(g) = gradient.as_mut() {
                gemm_into(
                    &mut g[first * hidden..(first + n) * hidden],
                    hidden,
                    (n, hidden, vocab),
                    (MatRef::rows(block, vocab), w_t),
                    (false, 1.0),
                    false,
                );
            }
        }
        let mut kept = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("head_logprobs: poisoned lock".into()))?;
        kept.gradient = gradient;
        kept.entropy = Some(entropy);
        Ok((
            CpuStorage::F32(logprobs),
            Shape::from(&dims[..dims.len() - 1]),
        ))
    }

    fn backward(&self, h: &Tensor, grad_res: &Tensor) -> Grad1 {
        let hidden = h.dims().last().copied().unwrap_or(1).max(1);
        let kept = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("head_logprobs: poisoned lock".into()))?;
        let Some(gradient) = kept.gradient.as_ref() else {
            return Err(candle_core::Error::Msg(
                "head_logprobs: backward through a pass that kept no gradient".into(),
            ));
        };
        let mut dh = vec![0f32; gradient.len()];
        with_f32(grad_res, "head_logprobs", |g| {
            dh.par_chunks_mut(hidden)
                .zip(gradient.par_chunks(hidden))
                .zip(g.par_iter())
                .for_each(|((out, row), &go)| {
                    for (o, v) in out.iter_mut().zip(row) {
                        *o = go * v;
                    }
                })
        })?;
        Ok(Some(Tensor::from_vec(dh, h.shape(), h.device())?))
    }
}

/// What [`head_logprobs`] returns: `log p(target)` per position (differentiable in the hidden
/// states) and each position's entropy (detached), both shaped like the targets.
pub(crate) struct HeadScores {
    pub(crate) logprobs: Tensor,
    pub(crate) entropy: Tensor,
}

/// Project `h` (.., hidden; f32 on the CPU) through the frozen `w` (hidden, vocab) and score
/// `targets` (.., u32) at `temperature`. `w_rows`, when given, is `w`'s transpose as a
/// (vocab, hidden) matrix (a tied embedding), used for the gradient's product.
pub(crate) fn head_logprobs(
    h: &Tensor,
    (w, w_rows): (&Tensor, Option<&Tensor>),
    targets: &Tensor,
    temperature: f64,
) -> candle_core::Result<HeadScores> {
    let op = Arc::new(HeadLogprobs {
        w: w.detach(),
        w_rows: w_rows.map(Tensor::detach),
        targets: targets.flatten_all()?.to_vec1::<u32>()?,
        temperature: temperature as f32,
        keep_gradient: h.track_op(),
        state: Mutex::new(Kept::default()),
    });
    let logprobs = h.contiguous()?.apply_op1(Shared(op.clone()))?;
    let entropy = op
        .state
        .lock()
        .map_err(|_| candle_core::Error::Msg("head_logprobs: poisoned lock".into()))?
        .entropy
        .take()
        .unwrap_or_default();
    let entropy = Tensor::from_vec(entropy, logprobs.shape(), logprobs.device())?;
    Ok(HeadScores { logprobs, entropy })
}
