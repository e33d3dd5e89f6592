//! The SwiGLU product `silu(gate) * up` as one differentiable CPU op.
//!
//! Two graph nodes (silu, then a product) whose backward, in candle, allocates a zeroed tensor
//! and a sum per edge and recomputes the sigmoid, all on (tokens, intermediate) tensors, the
//! widest activations of a layer. This op reads both inputs once forward and once backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Tensor};
use rayon::prelude::*;

use super::{Forward, Grads2};
use crate::ops::cpu::{f32_slice, with_f32};

/// Elements per parallel chunk.
const CHUNK: usize = 16 * 1024;

pub(crate) struct SwiGlu;

/// `silu(g) = g / (1 + exp(-g))`, spelled as candle spells it.
fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Forward {
        let gate = f32_slice(gs, gl, "swiglu", "gate")?;
        let up = f32_slice(us, ul, "swiglu", "up")?;
        if gl.shape() != ul.shape() {
            return Err(candle_core::Error::Msg(format!(
                "swiglu: gate {:?} and up {:?} differ",
                gl.shape(),
                ul.shape()
            )));
        }
        let mut y = vec![0f32; gate.len()];
        y.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(yc, (gc, uc))| {
                for ((y, g), u) in yc.iter_mut().zip(gc).zip(uc) {
                    *y = silu(*g) * u;
                }
            });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads2 {
        let n = gate.elem_count();
        let mut d_gate = vec![0f32; n];
        let mut d_up = vec![0f32; n];
        with_f32(gate, "swiglu", |gv| {
            with_f32(up, "swiglu", |uv| {
                with_f32(grad, "swiglu", |dv| {
                    d_gate
                        .par_chunks_mut(CHUNK)
                        .zip(d_up.par_chunks_mut(CHUNK))
                        .zip(gv.par_chunks(CHUNK).zip(uv.par_chunks(CHUNK)))
                        .zip(dv.par_chunks(CHUNK))
                        .for_each(|(((dgc, duc), (gc, uc)), dc)| {
                            for i in 0..gc.len() {
                                let (g, u, d) = (gc[i], uc[i], dc[i]);
                                let sig = 1.0 / (1.0 + (-g).exp());
                                // d silu / dg = sig (1 + g (1 - sig)); silu(g) = g sig.
                                dgc[i] = d * u * sig * (1.0 + g * (1.0 - sig));
                                duc[i] = d * (g * sig);
                            }
                        })
                })
            })
        })???;
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(d_gate, gate.shape(), dev)?),
            Some(Tensor::from_vec(d_up, up.shape(), dev)?),
        ))
    }
}

/// `silu(gate) * up` for two same-shaped f32 CPU tensors, differentiably.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::train::test_inputs::{randn, randn_var};
    use crate::testing::assert_op_matches;

    #[test]
    fn values_and_gradients_match_the_composite_spelling() -> anyhow::Result<()> {
        // Wider than one chunk, so the parallel split is exercised.
        let shape = (3, CHUNK / 2 + 7);
        let gate = randn_var(shape, 0.0, 3.0)?;
        let up = randn_var(shape, 0.0, 1.0)?;
        let upstream = randn(shape, 0.0, 1.0)?;
        let ours = swiglu(gate.as_tensor(), up.as_tensor())?;
        let plain = (candle_nn::ops::silu(gate.as_tensor())? * up.as_tensor())?;
        let vars = [("gate", &gate), ("up", &up)];
        assert_op_matches("swiglu", (&ours, &plain), &upstream, &vars, (1e-6, 1e-5))?;
        Ok(())
    }
}
