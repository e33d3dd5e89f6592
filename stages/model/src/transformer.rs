//! Our own Llama/Qwen2 decoder, with a differentiable train mode and a fused, cached eval mode.
//!
//! candle-transformers' models cannot be trained as shipped: their fused rms_norm, rope and
//! softmax kernels record no backward op, so gradients stop silently; they also return only the
//! last position's logits and know no padding. This file is one compact decoder for both
//! families (Qwen2 differs by q/k/v bias; Llama-3 by RoPE frequency scaling) with two modes:
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
//! tokens so far) and an additive mask (causal plus key padding). Grouped-query attention folds
//! the query heads of one key/value head into the matmul's rows, so keys and values are never
//! repeated in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::attention_probs::attention_probs;
use crate::attention_train::{attention_train, AttentionTables, Heads};
use crate::config::ModelConfig;
use crate::decode_attention::decode_attention;
use crate::decode_weight::{DecodeWeight, PanelCache, Stored};
use crate::derived_copy::DerivedCopy;
use crate::device::DeviceSetup;
use crate::frozen_matmul::{matmul_frozen_rhs, matmul_frozen_rhs_with};
use crate::head_logprobs::head_logprobs;
use crate::host_slice::with_f32s;
use crate::lora::{add_adapter, LoraAdapter, LoraConfig};
use crate::lora_linear::lora_linear;
use crate::losses::token_logprobs;
use crate::rms_norm::RmsNorm;
use crate::rope_train::rope_train;
use crate::seed::{self, Purpose};
use crate::swiglu::swiglu;
use crate::trainable_matmul::matmul_trainable_rhs;

/// Up to this many rows (a decode step's), an eval-mode product with a frozen f32 weight on the
/// CPU runs on the weight's [`DecodeWeight`] copy (packed panels, or the codes a quantised file
/// gave it) instead of a GEMM that repacks it per call.
/// Measured on SmolLM2's shapes at 16 rows (2-core Xeon, AVX-512): 135-174 GFLOPS against the
/// `gemm` crate's 63-89, and 89 against 35 for the output projection.
const FEW_ROWS: usize = 16;

/// Up to this many new positions per row, cached eval-mode attention on the CPU runs as
/// [`decode_attention`]'s loops (decode steps); longer prefills use batched matmuls.
const DECODE_POSITIONS: usize = 4;

/// Which kernels and which view of the weights a forward pass uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Differentiable ops; trainable weights tracked.
    Train,
    /// Fused kernels; all weights detached, no graph.
    Eval,
}

/// A parameter: a plain tensor (frozen, in the compute dtype) or a trainable f32 master `Var`.
pub(crate) enum Weight {
    Frozen(Tensor),
    Trainable(Var),
}

impl Weight {
    /// The weight as used by a forward pass in `mode`, cast to `dtype`.
    pub(crate) fn get(&self, mode: Mode, dtype: DType) -> Result<Tensor> {
        let t = match (self, mode) {
            (Weight::Frozen(t), _) => t.clone(),
            (Weight::Trainable(v), Mode::Train) => v.as_tensor().clone(),
            (Weight::Trainable(v), Mode::Eval) => v.as_detached_tensor(),
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// The stored values, detached.
    pub(crate) fn detached(&self) -> Tensor {
        match self {
            Weight::Frozen(t) => t.clone(),
            Weight::Trainable(v) => v.as_detached_tensor(),
        }
    }

    /// Make this weight trainable (an f32 master copy), if it is not already.
    pub(crate) fn make_trainable(&mut self) -> Result<()> {
        if let Weight::Frozen(t) = self {
            *self = Weight::Trainable(Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        Ok(())
    }

    /// Overwrite the stored values (shape must match), keeping the weight's kind and dtype.
    pub(crate) fn set(&mut self, value: &Tensor) -> Result<()> {
        match self {
            Weight::Frozen(t) => {
                if t.shape() != value.shape() {
                    bail!("shape {:?} does not match {:?}", value.shape(), t.shape());
                }
                *t = value.to_device(t.device())?.to_dtype(t.dtype())?;
            }
            Weight::Trainable(v) => {
                let value = value.to_device(v.device())?.to_dtype(v.dtype())?;
                v.set(&value)?;
            }
        }
        Ok(())
    }
}

/// A linear layer `y = x Wᵀ (+ b) (+ LoRA)`. The weight is held transposed, (in, out)
/// contiguous: candle's CPU matmul is several times faster with a row-major right-hand side
/// than with a transposed view at decode batch sizes (measured 6x at 16 rows).
pub(crate) struct Linear {
    pub(crate) weight_t: Weight,
    pub(crate) bias: Option<Weight>,
    pub(crate) lora: Option<LoraAdapter>,
    /// A frozen weight's packed copy for decode steps (see [`FEW_ROWS`]).
    pub(crate) panels: PanelCache,
    /// A frozen weight's (out, in) copy for training's input gradients.
    pub(crate) weight_rows: DerivedCopy<Tensor>,
}

impl Linear {
    pub(crate) fn new(weight_t: Weight, bias: Option<Weight>) -> Self {
        Linear {
            weight_t,
            bias,
            lora: None,
            panels: PanelCache::default(),
            weight_rows: DerivedCopy::default(),
        }
    }

    /// `x2 @ W (+ adapter)` for the few rows of a decode step (see [`FEW_ROWS`]), f32 on the
    /// CPU in eval mode with a frozen weight; None otherwise. An active adapter is applied on
    /// the host too: its two rank-r products are a few thousand multiply-adds per row, less
    /// than the fixed cost of the candle ops that would compute them.
    fn few_rows(&self, x2: &Tensor, cx: &Ctx) -> Result<Option<Tensor>> {
        let (rows, k) = x2.dims2()?;
        if cx.mode != Mode::Eval || rows > FEW_ROWS || x2.dtype() != DType::F32 {
            return Ok(None);
        }
        let Some(packed) = self.decode_weight()? else {
            return Ok(None);
        };
        let x = x2.flatten_all()?.to_vec1::<f32>()?;
        let mut y = packed.matmul(&x, rows);
        if let (Some(lora), true) = (&self.lora, cx.lora_enabled) {
            let (a, b) = (lora.a.as_detached_tensor(), lora.b.as_detached_tensor());
            with_f32s([&a, &b], "adapter", |[a, b]| {
                add_adapter(&mut y, &x, (a, b), (rows, k, packed.n()), lora.scale as f32)
            })?;
        }
        Ok(Some(Tensor::from_vec(y, (rows, packed.n()), x2.device())?))
    }

    /// The decode copy of a frozen f32 weight on the CPU; None for any other weight.
    fn decode_weight(&self) -> Result<Option<Arc<DecodeWeight>>> {
        match &self.weight_t {
            Weight::Frozen(w) if w.device().is_cpu() && w.dtype() == DType::F32 => {
                Ok(Some(self.panels.packed(w, Stored::InOut)?))
            }
            _ => Ok(None),
        }
    }

    /// A training pass's frozen projection on the CPU in f32, on `x` of any rank: with its
    /// adapter (when active and without dropout) as one [`lora_linear`] node, or alone as one
    /// [`matmul_frozen_rhs`] node, so no reshape nodes surround it. None where neither applies.
    fn train_frozen(&self, x: &Tensor, cx: &Ctx) -> Result<Option<Tensor>> {
        let Weight::Frozen(w) = &self.weight_t else {
            return Ok(None);
        };
        if cx.mode != Mode::Train || !cx.fused_cpu_ops(x) {
            return Ok(None);
        }
        // w's transpose, (out, in) row-major, for the input gradients (see `input_gradient`).
        let rows = self.weight_rows.get(w, |w| w.t()?.contiguous())?;
        let mut y = match (&self.lora, cx.lora_enabled) {
            (Some(lora), true) if lora.dropout == 0.0 => lora_linear(
                x,
                (w, Some(rows.as_ref())),
                lora.a.as_tensor(),
                lora.b.as_tensor(),
                lora.scale,
            )?,
            (Some(_), true) => return Ok(None),
            _ => matmul_frozen_rhs_with(x, w, Some(rows.as_ref()))?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.get(cx.mode, cx.dtype)?)?;
        }
        Ok(Some(y))
    }

    /// A training pass's trainable projection (full fine-tuning) on the CPU in f32, on `x` of
    /// any rank, as one [`matmul_trainable_rhs`] node. None where it does not apply (a frozen
    /// weight, another device or dtype, an active adapter).
    fn train_trainable(&self, x: &Tensor, cx: &Ctx) -> Result<Option<Tensor>> {
        let Weight::Trainable(w) = &self.weight_t else {
            return Ok(None);
        };
        let adapted = cx.lora_enabled && self.lora.is_some();
        if cx.mode != Mode::Train || !cx.fused_cpu_ops(x) || adapted {
            return Ok(None);
        }
        let mut y = matmul_trainable_rhs(x, w.as_tensor())?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.get(cx.mode, cx.dtype)?)?;
        }
        Ok(Some(y))
    }

    /// An eval pass's frozen projection with its active adapter, on the CPU in f32, beyond the
    /// few rows [`Self::few_rows`] streams: one [`lora_linear`] call (three GEMMs, the adapter
    /// accumulated into the base product) instead of the base product and five candle ops for
    /// the adapter, whose fixed costs drew a third of the main thread's samples in a GRPO
    /// rollout's decode. None where it does not apply.
    fn eval_adapted(&self, x: &Tensor, cx: &Ctx) -> Result<Option<Tensor>> {
        let (Weight::Frozen(w), Some(lora)) = (&self.weight_t, &self.lora) else {
            return Ok(None);
        };
        let width = x.dims().last().copied().unwrap_or(1).max(1);
        let rows = x.elem_count() / width;
        if cx.mode != Mode::Eval || !cx.lora_enabled || !cx.fused_cpu_ops(x) || rows <= FEW_ROWS {
            return Ok(None);
        }
        let (a, b) = (lora.a.as_detached_tensor(), lora.b.as_detached_tensor());
        let mut y = lora_linear(x, (w, None), &a, &b, lora.scale)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.get(cx.mode, cx.dtype)?)?;
        }
        Ok(Some(y))
    }

    fn forward(&self, x: &Tensor, cx: &Ctx) -> Result<Tensor> {
        if let Some(y) = self.train_frozen(x, cx)? {
            return Ok(y);
        }
        if let Some(y) = self.train_trainable(x, cx)? {
            return Ok(y);
        }
        if let Some(y) = self.eval_adapted(x, cx)? {
            return Ok(y);
        }
        // One large (rows, in) x (in, out) matmul whatever the leading dims are.
        let dims = x.dims().to_vec();
        let (inner, lead) = dims.split_last().context("linear input has no dims")?;
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, *inner))?;
        let few = self.few_rows(&x2, cx)?;
        let packed = few.is_some();
        let mut y = match (&self.weight_t, few) {
            (_, Some(y)) => y,
            // Frozen: only the input's gradient is needed (see `frozen_matmul`).
            (Weight::Frozen(w), None) => matmul_frozen_rhs(&x2, &w.to_dtype(cx.dtype)?)?,
            (Weight::Trainable(_), None) => x2.matmul(&self.weight_t.get(cx.mode, cx.dtype)?)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.get(cx.mode, cx.dtype)?)?;
        }
        if cx.lora_enabled && !packed {
            if let Some(lora) = &self.lora {
                y = (y + lora.forward(&x2, cx)?)?;
            }
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(y.dim(1)?);
        Ok(y.reshape(out_dims)?)
    }
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

/// The module names LoRA may target, in HF/PEFT spelling, with their parent module.
pub const LINEAR_MODULES: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

impl Block {
    pub(crate) fn linear(&self, module: &str) -> Option<&Linear> {
        Some(match module {
            "q_proj" => &self.q,
            "k_proj" => &self.k,
            "v_proj" => &self.v,
            "o_proj" => &self.o,
            "gate_proj" => &self.gate,
            "up_proj" => &self.up,
            "down_proj" => &self.down,
            _ => return None,
        })
    }

    pub(crate) fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        Some(match module {
            "q_proj" => &mut self.q,
            "k_proj" => &mut self.k,
            "v_proj" => &mut self.v,
            "o_proj" => &mut self.o,
            "gate_proj" => &mut self.gate,
            "up_proj" => &mut self.up,
            "down_proj" => &mut self.down,
            _ => return None,
        })
    }
}

/// Per-forward context shared by every layer.
pub(crate) struct Ctx<'a> {
    pub(crate) mode: Mode,
    pub(crate) dtype: DType,
    pub(crate) lora_enabled: bool,
    /// (b, t, head_dim/2) rotary tables for this batch's positions.
    cos: Tensor,
    sin: Tensor,
    /// (b, 1, 1, t, kv_len) additive f32 mask.
    mask: Tensor,
    /// Host copies of the tables and mask for [`attention_train`], made by the first layer
    /// that needs them.
    attention_tables: OnceLock<Arc<AttentionTables>>,
    pub(crate) dropout: Option<&'a Mutex<ChaCha8Rng>>,
}

impl Ctx<'_> {
    /// Whether the hand-written CPU ops (for training: attention probabilities, RoPE, SwiGLU,
    /// the frozen and adapted projections; for decoding: attention over the cache) apply to
    /// `x`: f32 compute on the CPU. Elsewhere (CUDA, bf16) the same maths runs as candle ops.
    fn attention_tables(&self) -> Result<Arc<AttentionTables>> {
        if let Some(tables) = self.attention_tables.get() {
            return Ok(tables.clone());
        }
        let tables = Arc::new(AttentionTables::new(&self.cos, &self.sin, &self.mask)?);
        Ok(self.attention_tables.get_or_init(|| tables).clone())
    }

    fn fused_cpu_ops(&self, x: &Tensor) -> bool {
        self.dtype == DType::F32 && x.dtype() == DType::F32 && x.device().is_cpu()
    }
}

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

/// Preallocated per-layer key/value storage for a batch: (b, kv_heads, capacity, head_dim).
pub(crate) struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Filled slots (the same for every row: rows are padded, not ragged).
    pub(crate) len: usize,
    capacity: usize,
}

impl KvCache {
    pub(crate) fn new(model: &Transformer, batch: usize, capacity: usize) -> Result<Self> {
        let cfg = &model.cfg;
        let shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim);
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k.push(Tensor::zeros(shape, model.dtype, &model.device)?);
            v.push(Tensor::zeros(shape, model.dtype, &model.device)?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    /// A cache for `batch` rows whose first slots hold `prefix`'s keys and values (a one-row
    /// cache) in every row; an empty cache without a prefix.
    pub(crate) fn starting_with(
        model: &Transformer,
        prefix: Option<&KvCache>,
        batch: usize,
        capacity: usize,
    ) -> Result<Self> {
        let mut cache = Self::new(model, batch, capacity)?;
        let Some(prefix) = prefix else {
            return Ok(cache);
        };
        let n = prefix.len;
        if n > capacity {
            bail!("internal: a {n}-slot prefix does not fit a {capacity}-slot cache");
        }
        for (dst, src) in cache
            .k
            .iter_mut()
            .chain(cache.v.iter_mut())
            .zip(prefix.k.iter().chain(prefix.v.iter()))
        {
            let (_, heads, _, dim) = src.dims4()?;
            let rows = src.narrow(2, 0, n)?.broadcast_as((batch, heads, n, dim))?;
            dst.slice_set(&rows.contiguous()?, 2, 0)?;
        }
        cache.len = n;
        Ok(cache)
    }

    /// Write this step's keys/values at `self.len` and return views of everything so far.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if self.len + t > self.capacity {
            bail!(
                "KV cache overflow: {} + {t} positions exceed its capacity {}",
                self.len,
                self.capacity
            );
        }
        self.k[layer].slice_set(&k.contiguous()?, 2, self.len)?;
        self.v[layer].slice_set(&v.contiguous()?, 2, self.len)?;
        let total = self.len + t;
        Ok((
            self.k[layer].narrow(2, 0, total)?,
            self.v[layer].narrow(2, 0, total)?,
        ))
    }

    /// Keep only the given batch rows (finished generations are dropped from the batch).
    pub(crate) fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let idx = Tensor::new(rows, self.k[0].device())?;
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(&idx, 0)?;
        }
        Ok(())
    }
}

pub struct Transformer {
    pub(crate) cfg: ModelConfig,
    pub(crate) device: Device,
    /// Compute dtype (activations, frozen weights).
    pub(crate) dtype: DType,
    pub(crate) embed: Weight,
    pub(crate) layers: Vec<Block>,
    pub(crate) final_norm: Weight,
    /// The output projection, transposed to (hidden, vocab); None when tied to the embedding.
    pub(crate) lm_head_t: Option<Weight>,
    /// A transposed copy of a frozen tied embedding, so the output projection gets the fast
    /// matmul layout; None when untied or when the embedding is trainable.
    pub(crate) embed_t: Option<Tensor>,
    /// The frozen output projection's packed copy for decode steps (see [`FEW_ROWS`]).
    head_panels: PanelCache,
    /// (positions, head_dim/2) f32 rotary tables.
    cos: Tensor,
    sin: Tensor,
    pub(crate) lora: Option<LoraConfig>,
    pub(crate) lora_enabled: bool,
    /// Source of LoRA dropout masks (train mode only, when dropout > 0).
    pub(crate) dropout_rng: Mutex<ChaCha8Rng>,
    /// Recorded in saved adapters as `base_model_name_or_path`.
    pub(crate) base_model_name: String,
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

/// RoPE built from differentiable ops, with per-row tables `cos`/`sin` of shape (b, t, d/2).
pub(crate) fn rope_differentiable(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<Tensor> {
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
        Ok(Tensor::cat(&[y0, y1], D::Minus1)?.reshape((b, h, t, d))?)
    } else {
        let cos = cos.reshape((b, 1, t, half))?;
        let sin = sin.reshape((b, 1, t, half))?;
        let x0 = x.narrow(D::Minus1, 0, half)?;
        let x1 = x.narrow(D::Minus1, half, half)?;
        let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let y1 = (x1.broadcast_mul(&cos)? + x0.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[y0, y1], D::Minus1)?)
    }
}

impl Transformer {
    /// Build from HF-named tensors (consumed); every weight starts frozen.
    pub fn from_tensors(
        cfg: ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        setup: &DeviceSetup,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Weight> {
            let t = tensors
                .remove(name)
                .with_context(|| format!("the weights have no tensor {name:?}"))?;
            if t.dims() != shape {
                bail!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    t.dims()
                );
            }
            let t = t.to_device(&setup.device)?.to_dtype(setup.compute_dtype)?;
            // Matrices other than the embedding are held transposed (see `Linear`).
            Ok(Weight::Frozen(
                if shape.len() == 2 && name != "model.embed_tokens.weight" {
                    t.t()?.contiguous()?
                } else {
                    t
                },
            ))
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_heads * hd;
        let kv_out = cfg.num_kv_heads * hd;
        let embed = take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let weight_t = take(&format!("{p}.{name}.weight"), &[out, inp])?;
                let bias = if bias {
                    Some(take(&format!("{p}.{name}.bias"), &[out])?)
                } else {
                    None
                };
                Ok(Linear::new(weight_t, bias))
            };
            let q = linear("self_attn.q_proj", q_out, h, cfg.qkv_bias)?;
            let k = linear("self_attn.k_proj", kv_out, h, cfg.qkv_bias)?;
            let v = linear("self_attn.v_proj", kv_out, h, cfg.qkv_bias)?;
            let o = linear("self_attn.o_proj", h, q_out, false)?;
            let gate = linear("mlp.gate_proj", cfg.intermediate_size, h, false)?;
            let up = linear("mlp.up_proj", cfg.intermediate_size, h, false)?;
            let down = linear("mlp.down_proj", h, cfg.intermediate_size, false)?;
            layers.push(Block {
                input_norm: take(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let final_norm = take("model.norm.weight", &[h])?;
        let lm_head_t = if cfg.tie_embeddings {
            None
        } else {
            Some(take("lm_head.weight", &[cfg.vocab_size, h])?)
        };
        let (cos, sin) = rope_tables(&cfg, &setup.device)?;
        let mut model = Transformer {
            cfg,
            device: setup.device.clone(),
            dtype: setup.compute_dtype,
            embed,
            layers,
            final_norm,
            lm_head_t,
            embed_t: None,
            head_panels: PanelCache::default(),
            cos,
            sin,
            lora: None,
            lora_enabled: true,
            // Replaced by `add_lora`; an adapter loaded from a file keeps this stream.
            dropout_rng: Mutex::new(seed::stream(Purpose::LoadedAdapterDropout)),
            base_model_name: String::new(),
        };
        model.refresh_embed_t()?;
        Ok(model)
    }

    /// Recompute the transposed copy of a frozen tied embedding after the embedding changed.
    pub(crate) fn refresh_embed_t(&mut self) -> Result<()> {
        self.embed_t = match (&self.embed, self.lm_head_t.is_none()) {
            (Weight::Frozen(e), true) => Some(e.t()?.contiguous()?),
            _ => None,
        };
        Ok(())
    }

    /// Random weights (uniform, deterministic in `seed`) with the real architecture, for tests
    /// and benchmarks.
    pub fn random(cfg: &ModelConfig, setup: &DeviceSetup, seed: u64) -> Result<Self> {
        let mut rng: ChaCha8Rng = seed::stream(Purpose::RandomWeights { seed });
        let mut tensors = HashMap::new();
        for (name, shape) in parameter_shapes(cfg) {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight");
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    let u: f32 = rng.random_range(-0.1..0.1);
                    if is_norm {
                        1.0 + u
                    } else {
                        u
                    }
                })
                .collect();
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(cfg.clone(), tensors, setup)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// Name written as `base_model_name_or_path` into saved adapters.
    pub fn set_base_model_name(&mut self, name: impl Into<String>) {
        self.base_model_name = name.into();
    }

    /// Every parameter by HF name in HF layout, detached, in its stored dtype (a tied
    /// `lm_head` is omitted).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.named_weight_refs()
            .into_iter()
            .map(|(n, w, transposed)| {
                let t = w.detached();
                Ok((n, if transposed { t.t()?.contiguous()? } else { t }))
            })
            .collect()
    }

    /// Every parameter by HF name, with whether it is held transposed relative to HF layout.
    pub(crate) fn named_weight_refs(&self) -> Vec<(String, &Weight, bool)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed, false)];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &layer.input_norm,
                false,
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &layer.post_norm,
                false,
            ));
            for (parent, module) in LINEAR_MODULES {
                if let Some(lin) = layer.linear(module) {
                    out.push((format!("{p}.{parent}.{module}.weight"), &lin.weight_t, true));
                    if let Some(b) = &lin.bias {
                        out.push((format!("{p}.{parent}.{module}.bias"), b, false));
                    }
                }
            }
        }
        out.push(("model.norm.weight".to_string(), &self.final_norm, false));
        if let Some(head) = &self.lm_head_t {
            out.push(("lm_head.weight".to_string(), head, true));
        }
        out
    }

    /// Mutable access to a parameter by HF name, with whether it is held transposed.
    pub(crate) fn weight_mut(&mut self, name: &str) -> Option<(&mut Weight, bool)> {
        match name {
            "model.embed_tokens.weight" => return Some((&mut self.embed, false)),
            "model.norm.weight" => return Some((&mut self.final_norm, false)),
            "lm_head.weight" => return self.lm_head_t.as_mut().map(|w| (w, true)),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (idx, rest) = rest.split_once('.')?;
        let layer = self.layers.get_mut(idx.parse::<usize>().ok()?)?;
        match rest {
            "input_layernorm.weight" => return Some((&mut layer.input_norm, false)),
            "post_attention_layernorm.weight" => return Some((&mut layer.post_norm, false)),
            _ => {}
        }
        let (_parent, rest) = rest.split_once('.')?;
        let (module, kind) = rest.split_once('.')?;
        let lin = layer.linear_mut(module)?;
        match kind {
            "weight" => Some((&mut lin.weight_t, true)),
            "bias" => lin.bias.as_mut().map(|b| (b, false)),
            _ => None,
        }
    }

    pub(crate) fn all_weights_mut(&mut self) -> Vec<&mut Weight> {
        let mut out: Vec<&mut Weight> = vec![&mut self.embed, &mut self.final_norm];
        if let Some(h) = self.lm_head_t.as_mut() {
            out.push(h);
        }
        for layer in self.layers.iter_mut() {
            out.push(&mut layer.input_norm);
            out.push(&mut layer.post_norm);
            for lin in [
                &mut layer.q,
                &mut layer.k,
                &mut layer.v,
                &mut layer.o,
                &mut layer.gate,
                &mut layer.up,
                &mut layer.down,
            ] {
                out.push(&mut lin.weight_t);
                if let Some(b) = lin.bias.as_mut() {
                    out.push(b);
                }
            }
        }
        out
    }

    /// Differentiable full-sequence forward: `ids` (b, t) u32, `attention_mask` (b, t) with 1 on
    /// real tokens (left or right padding). Returns f32 logits (b, t, vocab).
    pub fn forward_train(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        Ok(self.forward_train_hidden(ids, attention_mask, &[])?.0)
    }

    /// [`Self::forward_train`], also returning the output of each listed decoder layer
    /// (0-based; transformers' `hidden_states[i + 1]`), each (b, t, hidden).
    pub fn forward_train_hidden(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let rows = mask_rows(attention_mask)?;
        let (h, captured) = self.run(ids, &rows, Mode::Train, None, layers)?;
        Ok((self.logits(&h, Mode::Train)?, captured))
    }

    /// [`Self::forward_train_hidden`] with logits only for positions `from..from + len`
    /// (b, len, vocab): GRPO needs them only where they predict completion tokens, and the
    /// output projection with its backward is a fifth of a SmolLM2 step per position. (Slicing
    /// full logits instead would also cost a vocabulary-sized zero-filled gradient.)
    pub fn forward_train_hidden_range(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
        from: usize,
        len: usize,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let rows = mask_rows(attention_mask)?;
        let (h, captured) = self.run(ids, &rows, Mode::Train, None, layers)?;
        let t = h.dim(1)?;
        if len == 0 || from + len > t {
            bail!(
                "logits requested for positions {from}..{}, but the sequences have {t}",
                from + len
            );
        }
        let h = h.narrow(1, from, len)?.contiguous()?;
        Ok((self.logits(&h, Mode::Train)?, captured))
    }

    /// A differentiable forward pass scored at positions `from..from + len` only: the
    /// log-probability of `targets` (b, len) at each, at `temperature`, with each position's
    /// entropy and the outputs of the listed decoder `layers`. This is what SFT and GRPO
    /// train on; with a frozen output projection on the CPU in f32 no logits tensor is ever
    /// built (see `head_logprobs`), elsewhere it is the logits and [`token_logprobs`].
    pub fn forward_train_scores(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
        (from, len): (usize, usize),
        targets: &Tensor,
        temperature: f64,
    ) -> Result<PositionScores> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            bail!("temperature must be a positive number, got {temperature}");
        }
        let rows = mask_rows(attention_mask)?;
        let (h, hidden) = self.run(ids, &rows, Mode::Train, None, layers)?;
        let (b, t, _) = h.dims3()?;
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
            h
        } else {
            h.narrow(1, from, len)?.contiguous()?
        };
        let fused = h.device().is_cpu() && self.dtype == DType::F32;
        if let (Some(w), true) = (self.frozen_head()?, fused) {
            let targets = targets.to_dtype(DType::U32)?;
            // A tied frozen embedding is the head's transpose, stored row-major.
            let w_rows = match (&self.lm_head_t, &self.embed) {
                (None, Weight::Frozen(e)) => Some(e),
                _ => None,
            };
            let s = head_logprobs(&h, (&w, w_rows), &targets, temperature)?;
            return Ok(PositionScores {
                logprobs: s.logprobs,
                entropy: s.entropy,
                hidden,
            });
        }
        let logits = self.logits(&h, Mode::Train)?;
        let logprobs = token_logprobs(&logits, targets, temperature)?;
        let z = (logits.detach() / temperature)?;
        let logp_all = candle_nn::ops::log_softmax(&z, D::Minus1)?;
        let entropy = (logp_all.exp()? * &logp_all)?.sum(D::Minus1)?.neg()?;
        Ok(PositionScores {
            logprobs,
            entropy,
            hidden,
        })
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

    /// Project final hidden states (any leading dims) to f32 logits.
    pub(crate) fn logits(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        if let Some(logits) = self.few_row_logits(h, mode)? {
            return Ok(logits);
        }
        let (w_t, frozen) = match (&self.lm_head_t, &self.embed_t) {
            (Some(head @ Weight::Frozen(_)), _) => (head.get(mode, self.dtype)?, true),
            (Some(head), _) => (head.get(mode, self.dtype)?, false),
            (None, Some(embed_t)) => (embed_t.clone(), true),
            (None, None) => (self.embed.get(mode, self.dtype)?.t()?, false),
        };
        if frozen {
            // Any leading dims, and no reshape nodes around a logits-sized product.
            return Ok(matmul_frozen_rhs(&h.contiguous()?, &w_t)?.to_dtype(DType::F32)?);
        }
        if mode == Mode::Train && self.dtype == DType::F32 && h.device().is_cpu() {
            return Ok(matmul_trainable_rhs(h, &w_t)?);
        }
        let dims = h.dims().to_vec();
        let (inner, lead) = dims.split_last().context("hidden states have no dims")?;
        let rows: usize = lead.iter().product();
        let logits = h.reshape((rows, *inner))?.matmul(&w_t)?;
        let mut out = lead.to_vec();
        out.push(self.cfg.vocab_size);
        Ok(logits.reshape(out)?.to_dtype(DType::F32)?)
    }

    /// The output projection of a decode step (at most [`FEW_ROWS`] rows, f32 on the CPU, a
    /// frozen head or tied embedding) on its packed copy; None where it does not apply.
    fn few_row_logits(&self, h: &Tensor, mode: Mode) -> Result<Option<Tensor>> {
        let dims = h.dims().to_vec();
        let Some((_, lead)) = dims.split_last() else {
            return Ok(None);
        };
        let rows: usize = lead.iter().product();
        if mode != Mode::Eval || rows > FEW_ROWS || h.dtype() != DType::F32 {
            return Ok(None);
        }
        let Some(packed) = self.decode_head()? else {
            return Ok(None);
        };
        let logits = packed.matmul(&h.flatten_all()?.to_vec1::<f32>()?, rows);
        let mut out = lead.to_vec();
        out.push(packed.n());
        Ok(Some(Tensor::from_vec(logits, out, h.device())?))
    }

    /// The decode copy of a frozen f32 output projection (a head, or the tied embedding) on
    /// the CPU; None for any other.
    fn decode_head(&self) -> Result<Option<Arc<DecodeWeight>>> {
        let (head, stored) = match (&self.lm_head_t, &self.embed) {
            (Some(Weight::Frozen(head)), _) => (head, Stored::InOut),
            (None, Weight::Frozen(embed)) => (embed, Stored::OutIn),
            _ => return Ok(None),
        };
        if !head.device().is_cpu() || head.dtype() != DType::F32 {
            return Ok(None);
        }
        Ok(Some(self.head_panels.packed(head, stored)?))
    }

    /// How decode steps hold each projection, in layer order (q, k, v, o, gate, up, down),
    /// then the output head: `Some(bits)` when multiplied from 4- or 8-bit codes that give
    /// its f32 values exactly (weights read from a block-quantised file), `Some(32)` for f32
    /// panels, None where decode does not pack the weight (trainable, not f32, not on the CPU).
    /// Makes the decode copies that the first decode step would make, if none exist yet.
    pub fn decode_weight_bits(&self) -> Result<Vec<Option<usize>>> {
        let bits = |w: Option<Arc<DecodeWeight>>| w.map(|w| w.bits());
        let mut all = Vec::new();
        for b in &self.layers {
            for l in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down] {
                all.push(bits(l.decode_weight()?));
            }
        }
        all.push(bits(self.decode_head()?));
        Ok(all)
    }

    fn run(
        &self,
        ids: &Tensor,
        key_valid: &[Vec<bool>],
        mode: Mode,
        cache: Option<&mut KvCache>,
        capture: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, t) = ids
            .dims2()
            .context("token ids must be a (batch, seq) tensor")?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        if key_valid.len() != b || key_valid.iter().any(|r| r.len() != past + t) {
            bail!(
                "attention mask shape does not match ids: {} rows for batch {b}, expected {} slots each",
                key_valid.len(),
                past + t
            );
        }
        let (positions, mask) = positions_and_mask(key_valid, past, t);
        self.run_laid_out(ids, positions, mask, mode, cache, capture)
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
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len);
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
        let cos = self
            .cos
            .index_select(&pos, 0)?
            .reshape((b, t, half))?
            .to_dtype(self.dtype)?;
        let sin = self
            .sin
            .index_select(&pos, 0)?
            .reshape((b, t, half))?
            .to_dtype(self.dtype)?;
        let mask = Tensor::from_vec(mask, (b, 1, 1, t, past + t), &self.device)?;
        let cx = Ctx {
            mode,
            dtype: self.dtype,
            lora_enabled: self.lora_enabled,
            cos,
            sin,
            mask,
            attention_tables: OnceLock::new(),
            dropout: Some(&self.dropout_rng),
        };
        let embed = self.embed.get(mode, self.dtype)?;
        let mut x = embed
            .index_select(&ids.flatten_all()?.to_dtype(DType::U32)?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?;
        let mut captured = Vec::with_capacity(capture.len());
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.block(layer, i, &x, &cx, cache.as_deref_mut())?;
            if capture.contains(&i) {
                captured.push(x.clone());
            }
        }
        if let Some(c) = cache {
            c.len += t;
        }
        if captured.len() != capture.len() {
            bail!(
                "hidden states requested for layers {capture:?}, but the model has {} layers",
                self.layers.len()
            );
        }
        let x = self.norm(&x, &self.final_norm, mode)?;
        Ok((x, captured))
    }

    fn norm(&self, x: &Tensor, w: &Weight, mode: Mode) -> Result<Tensor> {
        let w = w.get(mode, self.dtype)?;
        let eps = self.cfg.rms_eps as f32;
        Ok(match mode {
            Mode::Train if x.device().is_cpu() && x.dtype() == DType::F32 => {
                x.contiguous()?.apply_op2(&w, RmsNorm { eps })?
            }
            Mode::Train => candle_nn::ops::rms_norm_slow(x, &w, eps)?,
            Mode::Eval => candle_nn::ops::rms_norm(&x.contiguous()?, &w, eps)?,
        })
    }

    fn block(
        &self,
        layer: &Block,
        index: usize,
        x: &Tensor,
        cx: &Ctx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.norm(x, &layer.input_norm, cx.mode)?;
        let attn = self.attention(layer, index, &h, cx, cache)?;
        let x = (x + attn)?;
        let h = self.norm(&x, &layer.post_norm, cx.mode)?;
        let (gate, up) = (layer.gate.forward(&h, cx)?, layer.up.forward(&h, cx)?);
        let product = if cx.fused_cpu_ops(&gate) {
            swiglu(&gate, &up)?
        } else {
            (candle_nn::ops::silu(&gate)? * up)?
        };
        let mlp = layer.down.forward(&product, cx)?;
        Ok((x + mlp)?)
    }

    fn attention(
        &self,
        layer: &Block,
        index: usize,
        x: &Tensor,
        cx: &Ctx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let rep = nh / nkv;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let (q, k, v) = (
            layer.q.forward(x, cx)?,
            layer.k.forward(x, cx)?,
            layer.v.forward(x, cx)?,
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
            return layer.o.forward(&out, cx);
        }
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let (q, k) = match cx.mode {
            Mode::Train if cx.fused_cpu_ops(&q) => (
                rope_train(&q, &cx.cos, &cx.sin, cfg.rope_interleaved)?,
                rope_train(&k, &cx.cos, &cx.sin, cfg.rope_interleaved)?,
            ),
            Mode::Train => (
                rope_differentiable(&q, &cx.cos, &cx.sin, cfg.rope_interleaved)?,
                rope_differentiable(&k, &cx.cos, &cx.sin, cfg.rope_interleaved)?,
            ),
            Mode::Eval => {
                let rope = if cfg.rope_interleaved {
                    candle_nn::rotary_emb::rope_i
                } else {
                    candle_nn::rotary_emb::rope
                };
                (rope(&q, &cx.cos, &cx.sin)?, rope(&k, &cx.cos, &cx.sin)?)
            }
        };
        let (k, v) = match cache {
            Some(c) => {
                let (k_seen, v_seen) = c.append(index, &k, &v)?;
                if cx.mode == Mode::Eval && t <= DECODE_POSITIONS && cx.fused_cpu_ops(&q) {
                    let (k_all, v_all) = (&c.k[index], &c.v[index]);
                    let out = decode_attention(&q, k_all, v_all, c.len + t, &cx.mask, scale)?;
                    return layer.o.forward(&out, cx);
                }
                (k_seen, v_seen)
            }
            None => (k, v),
        };
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
        let out = probs
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        layer.o.forward(&out, cx)
    }
}

/// HF parameter names and shapes of a model with this config.
pub fn parameter_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (name, o, i_) in [
            ("self_attn.q_proj", q_out, h),
            ("self_attn.k_proj", kv_out, h),
            ("self_attn.v_proj", kv_out, h),
            ("self_attn.o_proj", h, q_out),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ] {
            out.push((format!("{p}.{name}.weight"), vec![o, i_]));
            if cfg.qkv_bias
                && matches!(
                    name,
                    "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj"
                )
            {
                out.push((format!("{p}.{name}.bias"), vec![o]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// (positions, head_dim/2) cos and sin tables in f32.
fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq = cfg.inv_freq();
    let n = cfg.rope_table_len();
    let inv = Tensor::from_vec(inv_freq.clone(), (1, inv_freq.len()), device)?;
    let pos = Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let angles = pos.matmul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
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
