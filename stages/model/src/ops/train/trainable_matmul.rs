//! `x @ W` for a trainable `W` on the CPU, as one graph node whose backward writes each
//! gradient once.
//!
//! Full fine-tuning multiplies by trainable weights, and candle's `matmul` needs its input as
//! (rows, in): a reshape on each side is two more graph nodes, each costing a zeroed tensor and
//! an accumulating sum of an activation in candle's backward, and the products themselves zero
//! their outputs first and look up the thread count in the environment. Here any leading dims
//! are rows, `dx = g Wᵀ` is computed only when `x` is part of the graph, and `dW = xᵀ g` has
//! the weight's shape, so a transposed view (the tied output projection) passes its gradient on
//! through the transpose.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::frozen_matmul::with_last_dim;
use super::{Forward, Grads2};
use crate::ops::cpu::{f32_slice, with_f32};
use crate::ops::cpu::{gemm_new, matrix, with_matrix, MatRef};

struct TrainableMatmul;

impl CustomOp2 for TrainableMatmul {
    fn name(&self) -> &'static str {
        "trainable_matmul"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Forward {
        let dims = xl.shape().dims();
        let k = dims.last().copied().unwrap_or(0);
        let (k_w, n) = wl.shape().dims2()?;
        if k != k_w {
            return Err(candle_core::Error::Msg(format!(
                "trainable_matmul: input {:?} does not fit weight {:?}",
                xl.shape(),
                wl.shape()
            )));
        }
        let m = xl.shape().elem_count() / k.max(1);
        let x = MatRef::rows(f32_slice(xs, xl, "trainable_matmul", "input")?, k);
        let y = gemm_new((m, n, k), x, matrix(ws, wl, "trainable_matmul")?, 1.0);
        Ok((CpuStorage::F32(y), Shape::from(with_last_dim(dims, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads2 {
        let (k, n) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let (d_x, d_w) = with_f32(grad, "trainable_matmul", |g| {
            let g = MatRef::rows(g, n);
            let d_x = if x.track_op() {
                Some(with_matrix(w, "trainable_matmul", |w| {
                    gemm_new((m, k, n), g, w.t(), 1.0)
                })?)
            } else {
                None
            };
            let d_w = with_f32(x, "trainable_matmul", |x| {
                gemm_new((k, n, m), MatRef::rows(x, k).t(), g, 1.0)
            })?;
            Ok::<_, candle_core::Error>((d_x, d_w))
        })??;
        let d_x = match d_x {
            Some(d) => Some(Tensor::from_vec(d, x.shape(), x.device())?),
            None => None,
        };
        Ok((d_x, Some(Tensor::from_vec(d_w, (k, n), w.device())?)))
    }
}

/// `x @ w` for `x` (.., k) and a trainable `w` (k, n, any strides), both f32 on the CPU:
/// (.., n), with gradients for both.
pub(crate) fn matmul_trainable_rhs(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(w, TrainableMatmul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::train::test_inputs::{randn, randn_var};
    use crate::testing::assert_op_matches;

    #[test]
    fn values_and_both_gradients_match_broadcast_matmul() -> anyhow::Result<()> {
        let x = randn_var((2, 3, 4), 0.0, 1.0)?;
        // Stored (n, k) and used transposed, as the tied output projection is.
        let w = randn_var((5, 4), 0.0, 1.0)?;
        let upstream = randn((2, 3, 5), 0.0, 1.0)?;
        let ours = matmul_trainable_rhs(x.as_tensor(), &w.as_tensor().t()?)?;
        let plain = x.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?;
        assert_eq!(ours.dims(), &[2, 3, 5]);
        let vars = [("x", &x), ("W", &w)];
        assert_op_matches("matmul", (&ours, &plain), &upstream, &vars, (1e-6, 1e-5))?;
        Ok(())
    }
}
