//! Rotary position embedding as one differentiable CPU op.
//!
//! candle's fused `rope` has no backward, and its differentiable spelling (narrow, four
//! broadcast products, a sum, a difference, a concatenation) is about ten graph nodes per call,
//! two calls per layer, each edge costing a zeroed tensor and an accumulating sum in candle's
//! backward. A rotation's gradient is the inverse rotation, so this op reads its input once
//! forward and the upstream gradient once backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{Forward, Grad1};
use crate::ops::cpu::{f32_slice, with_f32};

/// Rotate (b, heads, t, d) by per-row tables `cos`/`sin` (b, t, d/2): halves (`x[..d/2]`
/// with `x[d/2..]`, Llama and Qwen2 in HF layout) or adjacent pairs when `interleaved`.
pub(crate) struct RopeTrain {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) interleaved: bool,
}

/// Which element pairs with which in a head of width `d`: (first, second) of pair `i`.
fn pair(i: usize, d: usize, interleaved: bool) -> (usize, usize) {
    if interleaved {
        (2 * i, 2 * i + 1)
    } else {
        (i, i + d / 2)
    }
}

impl RopeTrain {
    /// Rotate `x` by `sign` times the angles (`-1.0` undoes the rotation: the backward pass).
    fn rotate(&self, x: &[f32], shape: &Shape, sign: f32) -> candle_core::Result<Vec<f32>> {
        let (b, heads, t, d) = shape.dims4()?;
        let half = d / 2;
        let cos = self.cos.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let sin = self.sin.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        if d % 2 != 0 || cos.len() != b * t * half || sin.len() != cos.len() {
            return Err(candle_core::Error::Msg(format!(
                "rope: tables {:?} do not fit input {shape:?}",
                self.cos.dims()
            )));
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let (item, pos) = (row / (heads * t), row % t);
                let table = (item * t + pos) * half;
                for i in 0..half {
                    let (c, s) = (cos[table + i], sign * sin[table + i]);
                    let (a, z) = pair(i, d, self.interleaved);
                    yr[a] = xr[a] * c - xr[z] * s;
                    yr[z] = xr[z] * c + xr[a] * s;
                }
            });
        Ok(y)
    }
}

impl CustomOp1 for RopeTrain {
    fn name(&self) -> &'static str {
        "rope_train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Forward {
        let x = f32_slice(s, l, "rope", "input")?;
        Ok((
            CpuStorage::F32(self.rotate(x, l.shape(), 1.0)?),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Grad1 {
        let gx = with_f32(grad, "rope", |g| self.rotate(g, grad.shape(), -1.0))??;
        Ok(Some(Tensor::from_vec(gx, grad.shape(), grad.device())?))
    }
}

/// `x` (b, heads, t, d) f32 on the CPU rotated by `cos`/`sin` (b, t, d/2), differentiably.
pub(crate) fn rope_train(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(RopeTrain {
        cos: cos.detach(),
        sin: sin.detach(),
        interleaved,
    })
}

/// RoPE built from differentiable ops, with per-row tables `cos`/`sin` of shape (b, t, d/2).
pub(crate) fn rope_differentiable(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    if interleaved {
        let cos = cos.reshape((b, 1, t, half, 1))?;
        let sin = sin.reshape((b, 1, t, half, 1))?;
        let x = x.reshape((b, h, t, half, 2))?;
        let x0 = x.narrow(D::Minus1, 0, 1)?;
        let x1 = x.narrow(D::Minus1, 1, 1)?;
        let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Tensor::cat(&[y0, y1], D::Minus1)?.reshape((b, h, t, d))
    } else {
        let cos = cos.reshape((b, 1, t, half))?;
        let sin = sin.reshape((b, 1, t, half))?;
        let x0 = x.narrow(D::Minus1, 0, half)?;
        let x1 = x.narrow(D::Minus1, half, half)?;
        let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let y1 = (x1.broadcast_mul(&cos)? + x0.broadcast_mul(&sin)?)?;
        Tensor::cat(&[y0, y1], D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::train::test_inputs::{randn, randn_var};
    use crate::testing::assert_op_matches;

    #[test]
    fn values_and_gradient_match_the_composite_spelling_in_both_layouts() -> anyhow::Result<()> {
        let (b, heads, t, d) = (2, 3, 5, 8);
        let x = randn_var((b, heads, t, d), 0.0, 1.0)?;
        let cos = randn((b, t, d / 2), 0.0, 1.0)?;
        let sin = randn((b, t, d / 2), 0.0, 1.0)?;
        let upstream = randn((b, heads, t, d), 0.0, 1.0)?;
        for interleaved in [false, true] {
            let ours = rope_train(x.as_tensor(), &cos, &sin, interleaved)?;
            let plain = rope_differentiable(x.as_tensor(), &cos, &sin, interleaved)?;
            let what = format!("rope (interleaved={interleaved})");
            let vars = [("x", &x)];
            assert_op_matches(&what, (&ours, &plain), &upstream, &vars, (1e-6, 1e-5))?;
        }
        Ok(())
    }
}
