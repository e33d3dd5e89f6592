//! Shared pieces of the training kinds (`sft`, `rl`, `safety_data`): the GRPO objective,
//! batching, regularisers, interleaving schedules and resumable checkpoints.
//!
//! They live apart from the kinds so each can be tested on tiny tensors without a model,
//! and so the SFT steps that `rl` interleaves are the very same code as `sft`'s.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod early_stop;
pub mod grpo_loss;
pub mod metrics_log;
pub mod policy;
pub mod run;
pub mod schedule;
pub mod sft_step;
