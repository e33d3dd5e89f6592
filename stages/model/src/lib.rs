//! emflow's model layer on candle: our own decoder for Llama, Qwen2, Qwen3 and Phi-3 (train and
//! generate modes), LoRA, GGUF and sharded HF loading, tokenizer and chat templates, seeded
//! batched sampling, scoring, AdamW.
//!
//! A folder per concern, from the bottom up:
//!
//! * `ops/`: the hand-written kernels (`cpu`, `train`, `decode`); only the layers above call them.
//! * `transformer/`: the decoder (config, layers, forward passes, LoRA, fine-tuning switches).
//! * `text/`: tokenizer and chat templates.
//! * `weights/`: reading GGUF and safetensors, `load`, saving and reading adapters and weights.
//! * `generate`, `score`, `losses`, `optim`: sampling, scoring, training objectives, AdamW.
//! * `device`, `bench`, `testing`: where tensors live, throughput figures, shared test support.
//!
//! Other crates use the re-exports below and the public modules.

pub mod bench;
pub mod device;
pub mod generate;
pub mod losses;
mod ops;
pub mod optim;
pub mod score;
pub mod seed;
/// Shared helpers for tests across the workspace (real weights, paper data).
pub mod testing;
pub mod text;
pub mod transformer;
pub mod weights;

pub use device::{setup, DeviceSetup};
pub use generate::{
    derive_seed, Finish, Generation, GenerationObserver, GenerationRequest, SamplingParams,
    MIN_SHARED_PREFIX,
};
pub use losses::{masked_mean, masked_mean_per_row, masked_sum, sft_loss, token_logprobs};
pub use optim::{accumulate, clip_grad_norm, AdamW, AdamWConfig, LrSchedule, Schedule};
pub use text::{
    encode_chat, encode_prompt, ChatTemplate, EncodedChat, Message, TemplateKwargs, Tokenizer,
};
pub use transformer::{
    Arch, Llama3RopeScaling, LoraConfig, ModelConfig, Steering, TrainPass, Transformer,
};
pub use weights::{load, LoadedModel};
