//! What the training and sampling kinds hold on a GPU, for the engine's memory estimate
//! (`emflow_engine::memory`): each kind's `memory_demand` is built from these, so the kinds
//! say the same thing the same way.

use emflow_engine::memory::{MemoryDemand, Trainable};

use crate::train::policy::LoraParams;

/// Prompt tokens assumed for a sampling stage whose prompts have no length limit (eval
/// questions, safety prompts): the paper's longest evaluation prompts are under 1,000 tokens.
pub const PROMPT_ALLOWANCE: u64 = 1024;

/// What a training stage with these settings trains.
pub fn trainable(lora: &LoraParams, full_finetune: bool) -> Trainable {
    if full_finetune {
        return Trainable::Full;
    }
    Trainable::Lora {
        rank: lora.r as u64,
        targets: lora.targets.clone(),
    }
}

/// A stage that samples `batch_size` answers at once, each up to `max_tokens` after its
/// prompt (both the stage's params of those names: `eval`, `safety_data`).
pub fn sampling(batch_size: usize, max_tokens: usize) -> Option<MemoryDemand> {
    Some(MemoryDemand {
        training: None,
        train_batch: 0,
        train_tokens: 0,
        sample_batch: batch_size as u64,
        sample_tokens: PROMPT_ALLOWANCE + max_tokens as u64,
        gradient_checkpointing: false,
        checkpointing_param: None,
        batch_param: "batch_size",
        length_param: "max_tokens",
    })
}
