//! A training pass's CPU ops in f32, each one graph node with a hand-written backward: the
//! norm, RoPE, attention (fused, or its probabilities alone), SwiGLU, frozen, trainable and
//! LoRA-adapted projections, and the target tokens' log-probabilities (with or without the
//! output projection fused in).
//!
//! Spelled with candle ops, each of these is several nodes whose backward allocates a zeroed
//! tensor and a sum per edge; written once here, a SmolLM2 training step allocates and reads
//! far less. Called by the transformer (train mode) and `losses`; each op's unit tests compare
//! its values and gradients with the candle spelling it replaces. Built on `ops::cpu`.

use candle_core::{CpuStorage, Shape, Tensor};

mod attention_probs;
mod attention_train;
mod frozen_matmul;
mod fused_logprobs;
mod head_logprobs;
mod lora_linear;
mod rms_norm;
mod rope_train;
mod swiglu;
mod trainable_matmul;

pub(crate) use attention_probs::attention_probs;
pub(crate) use attention_train::{attention_train, AttentionTables, Heads};
pub(crate) use frozen_matmul::{matmul_frozen_rhs, matmul_frozen_rhs_with};
pub(crate) use fused_logprobs::TargetLogprobs;
pub(crate) use head_logprobs::head_logprobs;
pub(crate) use lora_linear::lora_linear;
pub(crate) use rms_norm::RmsNorm;
pub(crate) use rope_train::{rope_differentiable, rope_train};
pub(crate) use swiglu::swiglu;
pub(crate) use trainable_matmul::matmul_trainable_rhs;

// The results of the `CustomOp` methods every op here implements, named once so that a
// signature reads in one line.

/// A CPU forward's result: the output's storage and shape.
type Forward = candle_core::Result<(CpuStorage, Shape)>;
/// A one-input backward's result: the input's gradient.
type Grad1 = candle_core::Result<Option<Tensor>>;
/// A two-input backward's result: each input's gradient, `None` for one that gets none.
type Grads2 = candle_core::Result<(Option<Tensor>, Option<Tensor>)>;
/// A three-input backward's result.
type Grads3 = candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;

/// Random inputs for the ops' unit tests: f32 on the CPU, normal with the given mean and
/// standard deviation.
#[cfg(test)]
mod test_inputs {
    use candle_core::{Device, Result, Shape, Tensor, Var};

    pub(super) fn randn(shape: impl Into<Shape>, mean: f32, std: f32) -> Result<Tensor> {
        Tensor::randn(mean, std, shape, &Device::Cpu)
    }

    /// [`randn`] as a var, for an input whose gradient the test checks.
    pub(super) fn randn_var(shape: impl Into<Shape>, mean: f32, std: f32) -> Result<Var> {
        Var::from_tensor(&randn(shape, mean, std)?)
    }
}
