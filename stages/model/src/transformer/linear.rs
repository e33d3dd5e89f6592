//! A linear projection and the kernel each pass multiplies it with: hand-written CPU nodes in
//! training, the packed decode copy for the few rows of a decode step, a GEMM otherwise; with
//! its LoRA adapter when one is attached and enabled.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::lora::LoraAdapter;
use super::pass::Ctx;
use super::weight::{Mode, Weight};
use crate::ops::decode::{add_adapter, DecodeWeight, PanelCache, Stored};
use crate::ops::derived_copy::DerivedCopy;
use crate::ops::train::{
    lora_linear, matmul_frozen_rhs, matmul_frozen_rhs_with, matmul_trainable_rhs,
};

/// Up to this many rows (a decode step's), an eval-mode product with a frozen f32 weight on the
/// CPU runs on the weight's [`DecodeWeight`] copy (packed panels, or the codes a quantised file
/// gave it) instead of a GEMM that repacks it per call.
/// Measured on SmolLM2's shapes at 16 rows (2-core Xeon, AVX-512): 135-174 GFLOPS against the
/// `gemm` crate's 63-89, and 89 against 35 for the output projection.
pub(super) const FEW_ROWS: usize = 16;

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
            add_adapter(
                &mut y,
                &x,
                (&a, &b),
                (rows, k, packed.n()),
                lora.scale as f32,
            )?;
        }
        Ok(Some(Tensor::from_vec(y, (rows, packed.n()), x2.device())?))
    }

    /// The decode copy of a frozen f32 weight on the CPU; None for any other weight.
    pub(super) fn decode_weight(&self) -> Result<Option<Arc<DecodeWeight>>> {
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

    pub(super) fn forward(&self, x: &Tensor, cx: &Ctx) -> Result<Tensor> {
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
