//! Attention probabilities `softmax(scores * scale + mask)` as one differentiable CPU op.
//!
//! Spelled with candle ops (an affine, a broadcast add, then `softmax`'s max, subtract, exp, sum
//! and divide), this is seven graph nodes per layer, and candle's backward allocates a zeroed
//! tensor and an accumulating sum for every edge: about thirty passes over the scores per layer
//! in a training step. This op reads the scores once forward and, from its own output, once
//! backward: `d scores = scale * p * (g - sum(g * p))` row by row. Rows are independent, so
//! results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{Forward, Grad1};
use crate::ops::cpu::{f32_slice, with_f32};

/// The op, for scores laid out (b, heads, t, kv) and an additive mask (b, t, kv) shared by
/// every head.
pub(crate) struct AttentionProbs {
    pub(crate) scale: f32,
    pub(crate) mask: Tensor,
}

impl AttentionProbs {
    /// The mask's values and the (rows per batch item, t, kv) the scores must have.
    fn mask_and_dims(&self, scores: &Shape) -> candle_core::Result<(Vec<f32>, usize, usize)> {
        let (b, heads, t, kv) = scores.dims4()?;
        let mask = self.mask.contiguous()?;
        if mask.dims() != [b, t, kv] {
            return Err(candle_core::Error::Msg(format!(
                "attention_probs: mask {:?} does not match scores {scores:?}",
                mask.dims()
            )));
        }
        Ok((mask.flatten_all()?.to_vec1::<f32>()?, heads * t, t))
    }
}

impl CustomOp1 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention_probs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Forward {
        let scores = f32_slice(s, l, "attention_probs", "scores")?;
        let (mask, rows_per_item, t) = self.mask_and_dims(l.shape())?;
        let kv = l.shape().dims()[3];
        let mut p = vec![0f32; scores.len()];
        p.par_chunks_mut(kv)
            .zip(scores.par_chunks(kv))
            .enumerate()
            .for_each(|(row, (pr, sr))| {
                let (item, query) = (row / rows_per_item, row % t);
                let mr = &mask[(item * t + query) * kv..][..kv];
                let mut max = f32::NEG_INFINITY;
                for ((o, s), m) in pr.iter_mut().zip(sr).zip(mr) {
                    *o = s * self.scale + m;
                    max = max.max(*o);
                }
                let mut sum = 0f32;
                for o in pr.iter_mut() {
                    *o = (*o - max).exp();
                    sum += *o;
                }
                for o in pr.iter_mut() {
                    *o /= sum;
                }
            });
        Ok((CpuStorage::F32(p), l.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Grad1 {
        let kv = probs.dims().last().copied().unwrap_or(1).max(1);
        let mut gs = vec![0f32; probs.elem_count()];
        with_f32(probs, "attention_probs", |p| {
            with_f32(grad, "attention_probs", |g| {
                gs.par_chunks_mut(kv)
                    .zip(p.par_chunks(kv).zip(g.par_chunks(kv)))
                    .for_each(|(out, (pr, gr))| {
                        let dot: f32 = pr.iter().zip(gr).map(|(p, g)| p * g).sum();
                        for ((o, p), g) in out.iter_mut().zip(pr).zip(gr) {
                            *o = self.scale * p * (g - dot);
                        }
                    })
            })
        })??;
        Ok(Some(Tensor::from_vec(gs, probs.shape(), probs.device())?))
    }
}

/// `softmax(scores * scale + mask)` over the last dim, scores (b, heads, t, kv) f32 on the CPU,
/// mask (b, t, kv).
pub(crate) fn attention_probs(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1(AttentionProbs {
        scale: scale as f32,
        mask: mask.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::train::test_inputs::{randn, randn_var};
    use crate::testing::assert_op_matches;
    use candle_core::{Device, D};

    #[test]
    fn values_and_gradient_match_the_composite_spelling() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let (b, heads, t, kv) = (2, 3, 4, 6);
        let scores = randn_var((b, heads, t, kv), 0.0, 2.0)?;
        // A causal mask with one fully padded key, as transformer.rs builds it.
        let mut mask = vec![0f32; b * t * kv];
        for item in 0..b {
            for q in 0..t {
                for k in 0..kv {
                    if k > q + 2 || (item == 1 && k == 0) {
                        mask[(item * t + q) * kv + k] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, t, kv), &dev)?;
        let upstream = randn((b, heads, t, kv), 0.0, 1.0)?;
        let scale = 0.125;

        let ours = attention_probs(scores.as_tensor(), &mask, scale)?;
        let plain = candle_nn::ops::softmax(
            &(scores.as_tensor() * scale)?.broadcast_add(&mask.unsqueeze(1)?)?,
            D::Minus1,
        )?;
        let vars = [("scores", &scores)];
        assert_op_matches("softmax", (&ours, &plain), &upstream, &vars, (1e-6, 1e-6))?;
        Ok(())
    }
}
