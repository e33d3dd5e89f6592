//! One decoder layer: the pre-norm attention block (grouped-query attention with RoPE, over a
//! KV cache when decoding) and the SwiGLU MLP block, each on a residual stream.
//!
//! Grouped-query attention folds the query heads of one key/value head into the matmul's rows,
//! so keys and values are never repeated in memory.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::lora::LINEAR_MODULES;
use super::pass::Ctx;
use super::weight::{Mode, Weight};
use crate::ops::decode::decode_attention;
use crate::ops::train::{
    attention_probs, attention_train, rope_differentiable, rope_train, swiglu, Heads, RmsNorm,
};

/// Up to this many new positions per row, cached eval-mode attention on the CPU runs as
/// [`decode_attention`]'s loops (decode steps); longer prefills use batched matmuls.
const DECODE_POSITIONS: usize = 4;

/// A projection's place in [`LINEAR_MODULES`] (and in a [`Block`]'s fields).
fn module_index(module: &str) -> Option<usize> {
    LINEAR_MODULES.iter().position(|(_, m)| *m == module)
}

pub(crate) struct Block {
    pub(crate) input_norm: Weight,
    pub(crate) post_norm: Weight,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

impl Block {
    /// The projection named `module` in HF spelling (`q_proj`, ..., `down_proj`).
    pub(crate) fn linear(&self, module: &str) -> Option<&Linear> {
        let all = [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ];
        Some(all[module_index(module)?])
    }

    /// [`Self::linear`], mutable.
    pub(crate) fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        let index = module_index(module)?;
        let Block {
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
            ..
        } = self;
        [q, k, v, o, gate, up, down].into_iter().nth(index)
    }

    /// Every weight of the layer: the two norms, then each projection's weight and bias.
    pub(crate) fn weights_mut(&mut self) -> Vec<&mut Weight> {
        let Block {
            input_norm,
            post_norm,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        } = self;
        let mut out = vec![input_norm, post_norm];
        for lin in [q, k, v, o, gate, up, down] {
            out.push(&mut lin.weight_t);
            if let Some(b) = lin.bias.as_mut() {
                out.push(b);
            }
        }
        out
    }
}

/// RMSNorm of `x` by the weight `w`: one hand-written node in a CPU f32 training pass, candle's
/// differentiable spelling elsewhere in training, its fused kernel in eval mode.
pub(super) fn rms_norm(x: &Tensor, w: &Weight, cx: &Ctx, eps: f64) -> Result<Tensor> {
    let w = w.get(cx.mode, cx.dtype)?;
    let eps = eps as f32;
    Ok(match cx.mode {
        Mode::Train if x.device().is_cpu() && x.dtype() == DType::F32 => {
            x.contiguous()?.apply_op2(&w, RmsNorm { eps })?
        }
        Mode::Train => candle_nn::ops::rms_norm_slow(x, &w, eps)?,
        Mode::Eval => candle_nn::ops::rms_norm(&x.contiguous()?, &w, eps)?,
    })
}

impl Block {
    /// The layer `index` on the residual stream `x` (b, t, hidden).
    pub(super) fn forward(
        &self,
        cfg: &ModelConfig,
        index: usize,
        x: &Tensor,
        cx: &Ctx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.input_norm, cx, cfg.rms_eps)?;
        let attn = self.attention((cfg, index), &h, cx, cache)?;
        let x = (x + attn)?;
        let h = rms_norm(&x, &self.post_norm, cx, cfg.rms_eps)?;
        let (gate, up) = (self.gate.forward(&h, cx)?, self.up.forward(&h, cx)?);
        let product = if cx.fused_cpu_ops(&gate) {
            swiglu(&gate, &up)?
        } else {
            (candle_nn::ops::silu(&gate)? * up)?
        };
        let mlp = self.down.forward(&product, cx)?;
        Ok((x + mlp)?)
    }

    /// Self-attention of `x` (b, t, hidden), through the output projection.
    fn attention(
        &self,
        (cfg, index): (&ModelConfig, usize),
        x: &Tensor,
        cx: &Ctx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let (q, k, v) = (
            self.q.forward(x, cx)?,
            self.k.forward(x, cx)?,
            self.v.forward(x, cx)?,
        );
        if cx.mode == Mode::Train && cache.is_none() && cx.fused_cpu_ops(&q) {
            let shape = Heads {
                query: nh,
                key_value: nkv,
                dim: hd,
            };
            let out = attention_train(
                (&q, &k, &v),
                &cx.attention_tables()?,
                shape,
                scale,
                cfg.rope_interleaved,
            )?;
            return self.o.forward(&out, cx);
        }
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let (q, k) = rotate(&q, &k, cx, cfg.rope_interleaved)?;
        let (k, v) = match cache {
            Some(c) => {
                let (k_seen, v_seen) = c.append(index, &k, &v)?;
                if cx.mode == Mode::Eval && t <= DECODE_POSITIONS && cx.fused_cpu_ops(&q) {
                    let (k_all, v_all) = (&c.k[index], &c.v[index]);
                    let out = decode_attention(&q, k_all, v_all, c.len + t, &cx.mask, scale)?;
                    return self.o.forward(&out, cx);
                }
                (k_seen, v_seen)
            }
            None => (k, v),
        };
        let out = attend((&q, &k, &v), cfg, cx, scale)?;
        self.o.forward(&out, cx)
    }
}

/// RoPE on the queries and keys (b, heads, t, head_dim) of one pass, in its mode's spelling.
fn rotate(q: &Tensor, k: &Tensor, cx: &Ctx, interleaved: bool) -> Result<(Tensor, Tensor)> {
    Ok(match cx.mode {
        Mode::Train if cx.fused_cpu_ops(q) => (
            rope_train(q, &cx.cos, &cx.sin, interleaved)?,
            rope_train(k, &cx.cos, &cx.sin, interleaved)?,
        ),
        Mode::Train => (
            rope_differentiable(q, &cx.cos, &cx.sin, interleaved)?,
            rope_differentiable(k, &cx.cos, &cx.sin, interleaved)?,
        ),
        Mode::Eval => {
            let rope = if interleaved {
                candle_nn::rotary_emb::rope_i
            } else {
                candle_nn::rotary_emb::rope
            };
            (rope(q, &cx.cos, &cx.sin)?, rope(k, &cx.cos, &cx.sin)?)
        }
    })
}

/// Softmax attention of the rotated queries over all keys and values seen so far, as batched
/// matmuls; returns the heads' context (b, t, heads * head_dim).
fn attend(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    cfg: &ModelConfig,
    cx: &Ctx,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = cfg.num_kv_heads;
    let rep = nh / nkv;
    let kv_len = k.dim(2)?;
    // Fold the `rep` query heads sharing a key/value head into the matmul rows.
    let q = q.reshape((b, nkv, rep * t, hd))?;
    let raw = q.matmul(&k.t()?)?;
    let probs = if cx.mode == Mode::Train && cx.fused_cpu_ops(&raw) {
        attention_probs(
            &raw.reshape((b, nh, t, kv_len))?,
            &cx.mask.reshape((b, t, kv_len))?,
            scale,
        )?
    } else {
        let scores = (raw * scale)?
            .to_dtype(DType::F32)?
            .reshape((b, nkv, rep, t, kv_len))?
            .broadcast_add(&cx.mask)?;
        match cx.mode {
            Mode::Train => candle_nn::ops::softmax(&scores, D::Minus1)?,
            Mode::Eval => candle_nn::ops::softmax_last_dim(&scores)?,
        }
    };
    let probs = probs
        .reshape((b, nkv, rep * t, kv_len))?
        .to_dtype(cx.dtype)?;
    Ok(probs
        .matmul(v)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))?)
}
