//! A training step's self-attention, from the projections' outputs to the heads' context, as
//! one differentiable CPU op.
//!
//! Spelled with candle ops, attention is about twenty graph nodes per layer: the reshapes and
//! transposes into heads, their contiguous copies, RoPE on queries and keys, the score product,
//! the probabilities, the context product and the transposes back. candle's backward allocates a
//! zeroed tensor and an accumulating sum for every edge, so a LoRA step on SmolLM2 spent more
//! time in those sums than in its backward GEMMs. This op takes `q`, `k` and `v` as the
//! projections lay them out, (b, t, heads * d), and returns the context in the same layout, so
//! the whole block has three edges in and one out. Inside, each (item, key/value head) pair is
//! one task: the query heads that share the key/value head rotate, score, normalise and mix
//! with small GEMMs on strided views, and the forward pass keeps the probabilities for the
//! backward one. Every task's arithmetic is fixed, so results do not depend on the thread count.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{Forward, Grads3};
use crate::ops::cpu::{exp_nonpositive, lane_sum};
use crate::ops::cpu::{f32_slice, with_f32s};
use crate::ops::cpu::{gemm_into, MatRef};

/// Head counts and sizes of one attention layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub(crate) query: usize,
    pub(crate) key_value: usize,
    pub(crate) dim: usize,
}

impl Heads {
    /// (query heads, key/value heads, head size, query heads per key/value head).
    fn sizes(self) -> (usize, usize, usize, usize) {
        (
            self.query,
            self.key_value,
            self.dim,
            self.query / self.key_value,
        )
    }
}

/// A batch's per-row RoPE tables `cos`/`sin` (b, t, d/2) and additive mask (b, t, t) on the
/// host: read once per forward pass and shared by every layer.
pub(crate) struct AttentionTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    mask: Vec<f32>,
}

impl AttentionTables {
    pub(crate) fn new(cos: &Tensor, sin: &Tensor, mask: &Tensor) -> candle_core::Result<Self> {
        let host = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<f32>();
        Ok(AttentionTables {
            cos: host(cos)?,
            sin: host(sin)?,
            mask: host(mask)?,
        })
    }
}

/// The op.
pub(crate) struct AttentionTrain {
    heads: Heads,
    scale: f32,
    interleaved: bool,
    tables: Arc<AttentionTables>,
    /// The forward pass's probabilities, (b, query heads, t, t), for the backward pass.
    probs: Mutex<Option<Vec<f32>>>,
}

/// `dst [+]= A · B` on one thread, each operand given as (data, row stride, column stride).
fn small_gemm(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
) {
    let a = MatRef {
        data: a,
        rs: a_rs,
        cs: a_cs,
    };
    let b = MatRef {
        data: b,
        rs: b_rs,
        cs: b_cs,
    };
    gemm_into(dst, dst_rs, dims, (a, b), (accumulate, 1.0), true);
}

impl AttentionTrain {
    /// Item `item`'s head `head` from a (b, t, heads * d) tensor, rotated by `sign` times the
    /// RoPE angles into a contiguous (t, d) block.
    fn rotated(
        &self,
        x: &[f32],
        heads: usize,
        item: usize,
        head: usize,
        t: usize,
        sign: f32,
    ) -> Vec<f32> {
        let d = self.heads.dim;
        let mut out = vec![0f32; t * d];
        for (pos, row) in out.chunks_exact_mut(d).enumerate() {
            let src = &x[((item * t + pos) * heads + head) * d..][..d];
            self.rotate_row(src, row, item * t + pos, sign);
        }
        out
    }

    /// One head's row rotated by `sign` times the angles of table row `table_row`.
    fn rotate_row(&self, src: &[f32], dst: &mut [f32], table_row: usize, sign: f32) {
        let d = self.heads.dim;
        let half = d / 2;
        let (cos, sin) = (
            &self.tables.cos[table_row * half..][..half],
            &self.tables.sin[table_row * half..][..half],
        );
        for i in 0..half {
            let (c, s) = (cos[i], sign * sin[i]);
            let (a, z) = if self.interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            dst[a] = src[a] * c - src[z] * s;
            dst[z] = src[z] * c + src[a] * s;
        }
    }

    /// (b, t) of the inputs, checked against the heads, the tables and the mask.
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<(usize, usize)> {
        let Heads {
            query,
            key_value,
            dim,
        } = self.heads;
        let (b, t, width) = q.dims3()?;
        let ok = width == query * dim
            && k.dims() == [b, t, key_value * dim]
            && v.dims() == [b, t, key_value * dim]
            && key_value > 0
            && query % key_value == 0
            && dim % 2 == 0
            && self.tables.cos.len() == b * t * dim / 2
            && self.tables.sin.len() == self.tables.cos.len()
            && self.tables.mask.len() == b * t * t;
        if !ok {
            return Err(candle_core::Error::Msg(format!(
                "attention_train: q {q:?}, k {k:?}, v {v:?} do not fit {:?} with {} table and {} mask values",
                self.heads,
                self.tables.cos.len(),
                self.tables.mask.len()
            )));
        }
        Ok((b, t))
    }

    /// `(b, heads, t, d)` blocks back into the projections' `(b, t, heads * d)` layout.
    fn interleave_heads(blocks: &[f32], heads: usize, t: usize, d: usize) -> Vec<f32> {
        let mut out = vec![0f32; blocks.len()];
        out.par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(row, dst)| {
                let (item, pos) = (row / t, row % t);
                for (h, dh) in dst.chunks_exact_mut(d).enumerate() {
                    dh.copy_from_slice(&blocks[((item * heads + h) * t + pos) * d..][..d]);
                }
            });
        out
    }
}

impl CustomOp3 for AttentionTrain {
    fn name(&self) -> &'static str {
        "attention_train"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Forward {
        let (b, t) = self.dims(ql.shape(), kl.shape(), vl.shape())?;
        let q = f32_slice(qs, ql, "attention_train", "q")?;
        let k = f32_slice(ks, kl, "attention_train", "k")?;
        let v = f32_slice(vs, vl, "attention_train", "v")?;
        let (nh, nkv, d, rep) = self.heads.sizes();
        let mut context = vec![0f32; b * nh * t * d];
        let mut probs = vec![0f32; b * nh * t * t];
        context
            .par_chunks_mut(rep * t * d)
            .zip(probs.par_chunks_mut(rep * t * t))
            .enumerate()
            .for_each(|(task, (ctx, p))| {
                let (item, g) = (task / nkv, task % nkv);
                let kr = self.rotated(k, nkv, item, g, t, 1.0);
                let v_g = &v[(item * t * nkv + g) * d..];
                let mask = &self.tables.mask[item * t * t..][..t * t];
                for r in 0..rep {
                    let qr = self.rotated(q, nh, item, g * rep + r, t, 1.0);
                    let p_h = &mut p[r * t * t..][..t * t];
                    small_gemm((t, t, d), p_h, t, false, (&qr, d, 1), (&kr, 1, d));
                    for (row, m) in p_h.chunks_exact_mut(t).zip(mask.chunks_exact(t)) {
                        let mut max = f32::NEG_INFINITY;
                        for (o, m) in row.iter_mut().zip(m) {
                            *o = *o * self.scale + m;
                            max = max.max(*o);
                        }
                        for o in row.iter_mut() {
                            *o = exp_nonpositive(*o - max);
                        }
                        let inv = 1.0 / lane_sum(row);
                        for o in row.iter_mut() {
                            *o *= inv;
                        }
                    }
                    let ctx_h = &mut ctx[r * t * d..][..t * d];
                    small_gemm((t, d, t), ctx_h, d, false, (p_h, t, 1), (v_g, nkv * d, 1));
                }
            });
        *self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention_train: poisoned lock".into()))? =
            Some(probs);
        let out = Self::interleave_heads(&context, nh, t, d);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _context: &Tensor, grad: &Tensor) -> Grads3 {
        let (b, t) = self.dims(q.shape(), k.shape(), v.shape())?;
        let (nh, nkv, d, rep) = self.heads.sizes();
        let guard = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention_train: poisoned lock".into()))?;
        let probs = guard.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("attention_train: backward before forward".into())
        })?;
        let mut dq = vec![0f32; b * nh * t * d];
        let mut dk = vec![0f32; b * nkv * t * d];
        let mut dv = vec![0f32; b * nkv * t * d];
        with_f32s([q, k, v, grad], "attention_train", |[q, k, v, g]| {
            dq.par_chunks_mut(rep * t * d)
                .zip(dk.par_chunks_mut(t * d))
                .zip(dv.par_chunks_mut(t * d))
                .enumerate()
                .for_each(|(task, ((dq, dk), dv))| {
                    let (item, g_kv) = (task / nkv, task % nkv);
                    let kr = self.rotated(k, nkv, item, g_kv, t, 1.0);
                    let v_g = &v[(item * t * nkv + g_kv) * d..];
                    let mut dkr = vec![0f32; t * d];
                    let mut ds = vec![0f32; t * t];
                    let mut dqr = vec![0f32; t * d];
                    for r in 0..rep {
                        let h = g_kv * rep + r;
                        let qr = self.rotated(q, nh, item, h, t, 1.0);
                        let p_h = &probs[(item * nh + h) * t * t..][..t * t];
                        let go = &g[(item * t * nh + h) * d..];
                        // dV += Pᵀ · dO
                        small_gemm((t, d, t), dv, d, r > 0, (p_h, 1, t), (go, nh * d, 1));
                        // dP = dO · Vᵀ, then dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))
                        small_gemm(
                            (t, t, d),
                            &mut ds,
                            t,
                            false,
                            (go, nh * d, 1),
                            (v_g, 1, nkv * d),
                        );
                        for (dsr, pr) in ds.chunks_exact_mut(t).zip(p_h.chunks_exact(t)) {
                            let dot: f32 = dsr.iter().zip(pr).map(|(a, p)| a * p).sum();
                            for (a, p) in dsr.iter_mut().zip(pr) {
                                *a = self.scale * p * (*a - dot);
                            }
                        }
                        // dQ = dS · K, dK += dSᵀ · Q (both rotated)
                        small_gemm((t, d, t), &mut dqr, d, false, (&ds, t, 1), (&kr, d, 1));
                        small_gemm((t, d, t), &mut dkr, d, r > 0, (&ds, 1, t), (&qr, d, 1));
                        let dq_h = &mut dq[r * t * d..][..t * d];
                        for (pos, (src, dst)) in dqr
                            .chunks_exact(d)
                            .zip(dq_h.chunks_exact_mut(d))
                            .enumerate()
                        {
                            self.rotate_row(src, dst, item * t + pos, -1.0);
                        }
                    }
                    for (pos, (src, dst)) in
                        dkr.chunks_exact(d).zip(dk.chunks_exact_mut(d)).enumerate()
                    {
                        self.rotate_row(src, dst, item * t + pos, -1.0);
                    }
                })
        })?;
        let back = |blocks: &[f32], heads: usize, like: &Tensor| -> candle_core::Result<Tensor> {
            Tensor::from_vec(
                Self::interleave_heads(blocks, heads, t, d),
                like.shape(),
                like.device(),
            )
        };
        Ok((
            Some(back(&dq, nh, q)?),
            Some(back(&dk, nkv, k)?),
            Some(back(&dv, nkv, v)?),
        ))
    }
}

/// Self-attention of `q` (b, t, heads.query * d), `k` and `v` (b, t, heads.key_value * d), f32
/// on the CPU: RoPE by the per-row `tables`, then `softmax(q kᵀ * scale + mask) v` per head.
/// Returns the context as (b, t, heads.query * d).
pub(crate) fn attention_train(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    tables: &Arc<AttentionTables>,
    heads: Heads,
    scale: f64,
    interleaved: bool,
) -> candle_core::Result<Tensor> {
    let op = AttentionTrain {
        heads,
        scale: scale as f32,
        interleaved,
        tables: tables.clone(),
        probs: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::train::rope_differentiable;
    use crate::ops::train::test_inputs::{randn, randn_var};
    use crate::testing::assert_op_matches;
    use candle_core::{Device, Var, D};

    /// The candle spelling the transformer used before this op: heads, RoPE, grouped scores,
    /// softmax, context, heads back.
    fn composite(
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
        heads: Heads,
        scale: f64,
        interleaved: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let d = heads.dim;
        let rep = heads.query / heads.key_value;
        let split = |y: &Tensor, n: usize| y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let q = rope_differentiable(&split(q, heads.query)?, cos, sin, interleaved)?;
        let k = rope_differentiable(&split(k, heads.key_value)?, cos, sin, interleaved)?;
        let v = split(v, heads.key_value)?;
        let q = q.reshape((b, heads.key_value, rep * t, d))?;
        let scores = (q.matmul(&k.t()?)? * scale)?
            .reshape((b, heads.key_value, rep, t, t))?
            .broadcast_add(&mask.reshape((b, 1, 1, t, t))?)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.reshape((
            b,
            heads.key_value,
            rep * t,
            t,
        ))?;
        probs
            .matmul(&v)?
            .reshape((b, heads.query, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, heads.query * d))
    }

    #[test]
    fn values_and_gradients_match_the_composite_spelling() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let (b, t) = (2, 5);
        let heads = Heads {
            query: 6,
            key_value: 2,
            dim: 8,
        };
        let scale = 1.0 / (heads.dim as f64).sqrt();
        let var = |width: usize| -> anyhow::Result<Var> {
            Ok(randn_var((b, t, width * heads.dim), 0.0, 1.0)?)
        };
        let (q, k, v) = (
            var(heads.query)?,
            var(heads.key_value)?,
            var(heads.key_value)?,
        );
        // Item 1 is left-padded by two: its first two keys are masked for every query, and
        // its padded queries attend to themselves, as transformer.rs builds the mask.
        let mut mask = vec![0f32; b * t * t];
        let mut positions = vec![0f32; b * t];
        for item in 0..b {
            let pad = if item == 1 { 2 } else { 0 };
            for query in 0..t {
                positions[item * t + query] = query.saturating_sub(pad) as f32;
                for key in 0..t {
                    let visible = key <= query && (key >= pad || key == query);
                    if !visible {
                        mask[(item * t + query) * t + key] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, t, t), &dev)?;
        let half = heads.dim / 2;
        let angles =
            Tensor::from_vec(positions, (b, t, 1), &dev)?.broadcast_mul(&Tensor::from_vec(
                (0..half).map(|i| 0.3f32.powi(i as i32)).collect(),
                (1, 1, half),
                &dev,
            )?)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let upstream = randn((b, t, heads.query * heads.dim), 0.0, 1.0)?;
        let qkv = (q.as_tensor(), k.as_tensor(), v.as_tensor());

        for interleaved in [false, true] {
            let tables = Arc::new(AttentionTables::new(&cos, &sin, &mask)?);
            let ours = attention_train(qkv, &tables, heads, scale, interleaved)?;
            let plain = composite(qkv, (&cos, &sin), &mask, heads, scale, interleaved)?;
            let what = format!("attention (interleaved {interleaved})");
            let vars = [("q", &q), ("k", &k), ("v", &v)];
            assert_op_matches(&what, (&ours, &plain), &upstream, &vars, (1e-5, 1e-4))?;
        }
        Ok(())
    }
}
