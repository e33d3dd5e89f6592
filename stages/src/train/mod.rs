//! Shared pieces of the training kinds (`sft`, `rl`) and of the kinds that sample a model
//! (`eval`, `safety_data`):
//! - [`setup`]: loading the policy, a frozen model, the optimizer;
//! - [`sft_step`] and [`grpo_step`]: one optimizer step of each, in named phases, with the
//!   GRPO objective in [`grpo_loss`] and the KL/LDIFS terms toward the reference in
//!   [`regularise`];
//! - [`interleave`] and [`schedule`]: safety steps between the main steps; [`regenerate`]:
//!   `rl`'s safety examples regenerated from the current policy every K steps;
//! - [`resume`], [`checkpoint`], [`metrics_log`]: the data order and the checkpoints that
//!   make an interrupted run end in the same bytes as an uninterrupted one;
//! - [`batch`]: token sequences into padded tensors; [`early_stop`]: the best-reward tracker;
//! - [`snapshots`]: adapters saved at set fractions of a run, for EM over training.
//! - [`steering`]: preventive (persona-vector) steering of the policy's training passes.
//! - [`throughput`]: tokens per second for the progress log and the stage record, never an
//!   output.
//!
//! They live apart from the kinds so each can be tested on tiny tensors without a model,
//! and so the SFT steps that `rl` interleaves are the very same code as `sft`'s.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod early_stop;
pub mod grpo_loss;
pub mod grpo_step;
pub mod interleave;
pub mod metrics_log;
pub mod policy;
pub mod regenerate;
pub mod regularise;
pub mod resume;
pub mod schedule;
pub mod setup;
pub mod sft_step;
pub mod snapshots;
pub mod steering;
pub mod throughput;

use anyhow::Result;
use candle_core::Tensor;

/// A scalar tensor's value as f64 (the figures the logs hold).
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}
