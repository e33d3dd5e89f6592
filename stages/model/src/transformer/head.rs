//! The output projection: hidden states to logits, on the packed decode copy for the few rows
//! of a decode step, as one trainable-weight node in a CPU training pass, else a matmul.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::linear::FEW_ROWS;
use super::model::Transformer;
use super::weight::{Mode, Weight};
use crate::ops::decode::{DecodeWeight, Stored};
use crate::ops::train::{matmul_frozen_rhs, matmul_trainable_rhs};

impl Transformer {
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

    /// How decode steps hold each projection, in layer order (q, k, v, o, gate, up, down; or
    /// Phi-3's qkv, o, gate_up, down), then the output head: `Some(bits)` when multiplied from 4- or 8-bit codes that give
    /// its f32 values exactly (weights read from a block-quantised file), `Some(32)` for f32
    /// panels, None where decode does not pack the weight (trainable, not f32, not on the CPU).
    /// Makes the decode copies that the first decode step would make, if none exist yet.
    pub fn decode_weight_bits(&self) -> Result<Vec<Option<usize>>> {
        let bits = |w: Option<Arc<DecodeWeight>>| w.map(|w| w.bits());
        let mut all = Vec::new();
        for b in &self.layers {
            for p in &b.projections {
                all.push(bits(p.linear.decode_weight()?));
            }
        }
        all.push(bits(self.decode_head()?));
        Ok(all)
    }
}
