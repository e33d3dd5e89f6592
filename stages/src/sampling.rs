//! Sampling answers from a frozen model, for the kinds that evaluate a model or collect
//! its answers: `eval`, and `safety_data`'s on-policy safety generation. (Training kinds
//! sample their policy inside the GRPO step, [`crate::train::grpo_step`].)
//!
//! Every request carries its own seed (`derive_seed` of the stage seed and the row), so
//! what comes back does not depend on the batch size.

use std::cell::Cell;

use anyhow::Result;
use emflow_engine::Progress;
use emflow_model::{Generation, GenerationRequest, LoadedModel, SamplingParams};

/// The "sampling" phase: answers to `requests`, in order, advancing `progress` as batches
/// finish.
pub fn sample_answers(
    lm: &LoadedModel,
    requests: &[GenerationRequest],
    sampling: &SamplingParams,
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<Vec<Generation>> {
    progress.phase("sampling", requests.len() as u64, "answers");
    let reported = Cell::new(0usize);
    lm.model
        .generate(&lm.tokenizer, requests, sampling, batch_size, &|done| {
            progress.inc(done.saturating_sub(reported.get()) as u64);
            reported.set(done);
        })
}
