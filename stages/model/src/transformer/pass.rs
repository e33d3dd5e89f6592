//! What one forward pass hands every layer: its mode and dtype, the rotary tables and additive
//! mask for this batch's positions, and the LoRA dropout stream.

use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand_chacha::ChaCha8Rng;

use super::weight::Mode;
use crate::ops::train::AttentionTables;

/// Per-forward context shared by every layer.
pub(crate) struct Ctx<'a> {
    pub(crate) mode: Mode,
    pub(crate) dtype: DType,
    pub(crate) lora_enabled: bool,
    /// (b, t, head_dim/2) rotary tables for this batch's positions.
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// (b, 1, 1, t, kv_len) additive f32 mask.
    pub(super) mask: Tensor,
    /// Host copies of the tables and mask for [`attention_train`](crate::ops::train::attention_train), made by the first layer
    /// that needs them.
    pub(super) attention_tables: OnceLock<Arc<AttentionTables>>,
    pub(crate) dropout: Option<&'a Mutex<ChaCha8Rng>>,
}

impl Ctx<'_> {
    /// The host copies of the tables and mask for [`attention_train`](crate::ops::train::attention_train), shared by every layer.
    pub(super) fn attention_tables(&self) -> Result<Arc<AttentionTables>> {
        if let Some(tables) = self.attention_tables.get() {
            return Ok(tables.clone());
        }
        let tables = Arc::new(AttentionTables::new(&self.cos, &self.sin, &self.mask)?);
        Ok(self.attention_tables.get_or_init(|| tables).clone())
    }

    /// Whether the hand-written CPU ops (for training: attention probabilities, RoPE, SwiGLU,
    /// the frozen and adapted projections; for decoding: attention over the cache) apply to
    /// `x`: f32 compute on the CPU. Elsewhere (CUDA, bf16) the same maths runs as candle ops.
    pub(super) fn fused_cpu_ops(&self, x: &Tensor) -> bool {
        self.dtype == DType::F32 && x.dtype() == DType::F32 && x.device().is_cpu()
    }
}
