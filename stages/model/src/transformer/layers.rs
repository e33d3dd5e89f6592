//! One decoder layer: the pre-norm attention block (grouped-query attention with RoPE, over a
//! KV cache when decoding) and the SwiGLU MLP block, each on a residual stream; with Qwen3's
//! per-head q/k norms and Phi-3's fused projections where the architecture has them.
//!
//! Grouped-query attention folds the query heads of one key/value head into the matmul's rows,
//! so keys and values are never repeated in memory.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, D};

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::pass::Ctx;
use super::weight::{Mode, Weight};
use crate::ops::decode::decode_attention;
use crate::ops::train::{
    attention_probs, attention_train, rope_differentiable, rope_train, swiglu, Heads, RmsNorm,
};

/// Up to this many new positions per row, cached eval-mode attention on the CPU runs as
/// [`decode_attention`]'s loops (decode steps); longer prefills use batched matmuls.
const DECODE_POSITIONS: usize = 4;

/// One projection of a layer with its HF name (`self_attn`, `q_proj`).
pub(crate) struct Projection {
    pub(crate) parent: &'static str,
    pub(crate) module: &'static str,
    pub(crate) linear: Linear,
}

pub(crate) struct Block {
    pub(crate) input_norm: Weight,
    pub(crate) post_norm: Weight,
    /// Qwen3's `q_norm` and `k_norm`: RMSNorm weights (head_dim) over each query and key head,
    /// applied before RoPE.
    pub(crate) qk_norm: Option<(Weight, Weight)>,
    /// The projections in the order of `lora::linear_modules(arch)`: q, k, v, o, gate, up,
    /// down; or Phi-3's qkv, o, gate_up, down.
    pub(crate) projections: Vec<Projection>,
}

impl Block {
    /// The projection named `module` in HF spelling (`q_proj`, `qkv_proj`, ..., `down_proj`).
    pub(crate) fn linear(&self, module: &str) -> Option<&Linear> {
        self.projections
            .iter()
            .find(|p| p.module == module)
            .map(|p| &p.linear)
    }

    /// [`Self::linear`], mutable.
    pub(crate) fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        self.projections
            .iter_mut()
            .find(|p| p.module == module)
            .map(|p| &mut p.linear)
    }

    /// [`Self::linear`] for a projection this layer's architecture must have.
    fn expect(&self, module: &str) -> Result<&Linear> {
        self.linear(module)
            .with_context(|| format!("internal: a layer without {module}"))
    }

    /// Every weight of the layer: the norms, then each projection's weight and bias.
    pub(crate) fn weights_mut(&mut self) -> Vec<&mut Weight> {
        let mut out = vec![&mut self.input_norm, &mut self.post_norm];
        if let Some((q, k)) = self.qk_norm.as_mut() {
            out.extend([q, k]);
        }
        for p in self.projections.iter_mut() {
            out.push(&mut p.linear.weight_t);
            if let Some(b) = p.linear.bias.as_mut() {
                out.push(b);
            }
        }
        out
    }

    /// The queries, keys and values of `x` (b, t, hidden), each (b, t, heads * head_dim), with
    /// Qwen3's per-head norms applied: from q/k/v_proj, or cut from Phi-3's `qkv_proj` output
    /// (queries, then keys, then values, as transformers splits it).
    fn qkv(&self, cfg: &ModelConfig, x: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = match self.linear("qkv_proj") {
            Some(qkv) => {
                let y = qkv.forward(x, cx)?;
                let (q_out, kv_out) = (
                    cfg.num_heads * cfg.head_dim,
                    cfg.num_kv_heads * cfg.head_dim,
                );
                let last = y.rank() - 1;
                (
                    y.narrow(last, 0, q_out)?.contiguous()?,
                    y.narrow(last, q_out, kv_out)?.contiguous()?,
                    y.narrow(last, q_out + kv_out, kv_out)?.contiguous()?,
                )
            }
            None => (
                self.expect("q_proj")?.forward(x, cx)?,
                self.expect("k_proj")?.forward(x, cx)?,
                self.expect("v_proj")?.forward(x, cx)?,
            ),
        };
        let Some((q_norm, k_norm)) = &self.qk_norm else {
            return Ok((q, k, v));
        };
        let per_head = |y: &Tensor, w: &Weight| -> Result<Tensor> {
            let dims = y.dims().to_vec();
            let (width, lead) = dims.split_last().context("projection output has no dims")?;
            let mut heads = lead.to_vec();
            heads.extend([width / cfg.head_dim, cfg.head_dim]);
            Ok(rms_norm(&y.reshape(heads)?, w, cx, cfg.rms_eps)?.reshape(dims)?)
        };
        Ok((per_head(&q, q_norm)?, per_head(&k, k_norm)?, v))
    }

    /// The MLP's gate and up projections of `h`: from gate/up_proj, or the two halves of
    /// Phi-3's `gate_up_proj` output (gate first, as transformers' `chunk(2)`).
    fn gate_up(&self, h: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let Some(fused) = self.linear("gate_up_proj") else {
            return Ok((
                self.expect("gate_proj")?.forward(h, cx)?,
                self.expect("up_proj")?.forward(h, cx)?,
            ));
        };
        let y = fused.forward(h, cx)?;
        let last = y.rank() - 1;
        let half = y.dim(last)? / 2;
        Ok((
            y.narrow(last, 0, half)?.contiguous()?,
            y.narrow(last, half, half)?.contiguous()?,
        ))
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
        let (gate, up) = self.gate_up(&h, cx)?;
        let product = if cx.fused_cpu_ops(&gate) {
            swiglu(&gate, &up)?
        } else {
            (candle_nn::ops::silu(&gate)? * up)?
        };
        let mlp = self.expect("down_proj")?.forward(&product, cx)?;
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
        let (q, k, v) = self.qkv(cfg, x, cx)?;
        let o = self.expect("o_proj")?;
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
            return o.forward(&out, cx);
        }
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let (q, k) = rotate(&q, &k, cx, cfg.rope_interleaved)?;
        let (k, v) = match cache {
            Some(c) => {
                let (k_seen, v_seen) = c.append(index, &k, &v)?;
                if cx.mode == Mode::Eval && t <= DECODE_POSITIONS && cx.fused_cpu_ops(&q) {
                    let (k_all, v_all) = (&c.k[index], &c.v[index]);
                    let out = decode_attention(&q, k_all, v_all, c.len + t, &cx.mask, scale)?;
                    return o.forward(&out, cx);
                }
                (k_seen, v_seen)
            }
            None => (k, v),
        };
        let out = attend((&q, &k, &v), cfg, cx, scale)?;
        o.forward(&out, cx)
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
