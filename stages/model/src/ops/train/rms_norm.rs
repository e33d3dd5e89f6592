//! RMSNorm `y = x / sqrt(mean(x²) + eps) * w` as one differentiable CPU op.
//!
//! candle's fused `rms_norm` has no backward (gradients stop there without an error), and its
//! differentiable spelling (`rms_norm_slow`) is six ops whose backward allocates a dozen
//! activation-sized tensors per norm, 61 norms per SmolLM2 pass. This op reads each row once
//! forward and twice backward. The weight's gradient is summed over fixed blocks of rows and
//! then across blocks in order, so it does not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, Layout, Tensor};
use rayon::prelude::*;

use super::{Forward, Grads2};
use crate::ops::cpu::f32_slice;

/// Rows per block of the weight-gradient sum (fixed, for thread-count-free results).
const ROWS_PER_BLOCK: usize = 32;

pub(crate) struct RmsNorm {
    pub(crate) eps: f32,
}

fn host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// `1 / sqrt(mean(row²) + eps)`.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm_train"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Forward {
        let x = f32_slice(xs, xl, "rms_norm", "input")?;
        let w = f32_slice(ws, wl, "rms_norm", "weight")?;
        let h = w.len();
        if h == 0 || x.len() % h != 0 || xl.shape().dims().last() != Some(&h) {
            return Err(candle_core::Error::Msg(format!(
                "rms_norm: input {:?} does not end in the weight's size {h}",
                xl.shape()
            )));
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(yr, xr)| {
                let r = inv_rms(xr, self.eps);
                for ((o, v), wv) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * r * wv;
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Grads2 {
        let (xv, wv, gv) = (host(x)?, host(w)?, host(grad_res)?);
        let h = wv.len();
        let mut gx = vec![0f32; xv.len()];
        // With xhat = x r:  dx = r (g w - xhat mean(g w xhat)),  dw = sum over rows of g xhat.
        let block_dw: Vec<Vec<f32>> = gx
            .par_chunks_mut(h * ROWS_PER_BLOCK)
            .zip(xv.par_chunks(h * ROWS_PER_BLOCK))
            .zip(gv.par_chunks(h * ROWS_PER_BLOCK))
            .map(|((gxb, xb), gb)| {
                let mut dw = vec![0f32; h];
                for ((gxr, xr), gr) in gxb.chunks_mut(h).zip(xb.chunks(h)).zip(gb.chunks(h)) {
                    let r = inv_rms(xr, self.eps);
                    let mut dot = 0f32;
                    for i in 0..h {
                        dot += gr[i] * wv[i] * xr[i] * r;
                        dw[i] += gr[i] * xr[i] * r;
                    }
                    let mean = dot / h as f32;
                    for i in 0..h {
                        gxr[i] = r * (gr[i] * wv[i] - xr[i] * r * mean);
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; h];
        for block in &block_dw {
            for (d, b) in dw.iter_mut().zip(block) {
                *d += b;
            }
        }
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::train::test_inputs::{randn, randn_var};
    use crate::testing::assert_op_matches;

    #[test]
    fn matches_the_differentiable_spelling_forward_and_backward() -> anyhow::Result<()> {
        let x = randn_var((3, 70, 24), 0.0, 1.0)?;
        let w = randn_var(24, 1.0, 0.3)?;
        let target = randn((3, 70, 24), 0.0, 1.0)?;
        let ours = x
            .as_tensor()
            .apply_op2(w.as_tensor(), RmsNorm { eps: 1e-5 })?;
        let slow = candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let vars = [("x", &x), ("w", &w)];
        assert_op_matches("rms_norm", (&ours, &slow), &target, &vars, (1e-5, 1e-3))?;
        Ok(())
    }
}
