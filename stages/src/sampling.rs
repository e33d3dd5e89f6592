//! Sampling answers from a frozen model, for the kinds that evaluate a model or collect
//! its answers: `eval`, and `safety_data`'s on-policy safety generation. (Training kinds
//! sample their policy inside the GRPO step, [`crate::train::grpo_step`].)
//!
//! Every request carries its own seed (`derive_seed` of the stage seed and the row), so
//! what comes back does not depend on the batch size.
//!
//! The two params these kinds share, [`Temperature`] and [`TopP`], are field types: each kind
//! declares `#[serde(default)] temperature: Temperature`, and the doc, default and range
//! `emflow kinds` shows come from the type, written once. Not a `#[serde(flatten)]`ed
//! settings struct: flatten does not combine with `deny_unknown_fields` (which
//! `safety_data` has), and a field type keeps each param at its place in the kind's order.

use std::cell::Cell;
use std::time::Instant;

use anyhow::Result;
use emflow_engine::Progress;
use emflow_model::{Generation, GenerationRequest, LoadedModel, SamplingParams};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// The doc comments of these two types are the params' docs (a field without a doc of its
// own shows its type's); the defaults enter every stage key, as 1.0 each.

/// sampling temperature (0 = greedy)
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema)]
pub struct Temperature(#[schemars(range(min = 0.0))] pub f64);

impl Default for Temperature {
    fn default() -> Self {
        Temperature(1.0)
    }
}

/// nucleus sampling (1 = off)
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema)]
#[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
pub struct TopP(pub f64);

impl Default for TopP {
    fn default() -> Self {
        TopP(1.0)
    }
}

/// The "sampling" phase: answers to `requests`, in order, advancing `progress` as batches
/// finish; ends with a log line of the tokens generated per second (the log only: wall-clock
/// figures never enter an output, see [`crate::train::throughput`]).
pub fn sample_answers(
    lm: &LoadedModel,
    requests: &[GenerationRequest],
    sampling: &SamplingParams,
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<Vec<Generation>> {
    progress.phase("sampling", requests.len() as u64, "answers");
    let reported = Cell::new(0usize);
    let started = Instant::now();
    let gens = lm
        .model
        .generate(&lm.tokenizer, requests, sampling, batch_size, &|done| {
            progress.inc(done.saturating_sub(reported.get()) as u64);
            reported.set(done);
        })?;
    let secs = started.elapsed().as_secs_f64();
    let tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
    progress.log(&format!(
        "sampled {} answers, {tokens} tokens in {secs:.1}s ({:.0} tok/s)",
        gens.len(),
        tokens as f64 / secs.max(1e-9)
    ));
    Ok(gens)
}
