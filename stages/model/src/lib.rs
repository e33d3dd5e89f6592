//! emflow's model layer on candle: our own Llama/Qwen2 (train and generate modes), LoRA, GGUF
//! and HF loading, tokenizer and chat templates, seeded batched sampling, scoring, AdamW.

mod adamw_host;
mod attention_probs;
mod attention_train;
pub mod bench;
pub mod chat;
mod coded_panels;
pub mod config;
mod cpu_gemm;
mod decode_attention;
mod decode_weight;
mod derived_copy;
pub mod device;
mod frozen_matmul;
mod fused_logprobs;
pub mod generate;
mod head_logprobs;
mod host_slice;
mod loader;
pub mod lora;
mod lora_linear;
pub mod losses;
pub mod optim;
mod panel_matmul;
mod rms_norm;
mod rope_train;
pub mod score;
pub mod seed;
mod softmax_rows;
mod swiglu;
/// Shared helpers for tests across the workspace (real weights, paper data).
pub mod testing;
pub mod tokenizer;
mod trainable_matmul;
pub mod transformer;
pub mod weights;
pub use chat::{encode_chat, encode_prompt, ChatTemplate, EncodedChat, Message};
pub use config::{Arch, Llama3RopeScaling, ModelConfig};
pub use device::{setup, DeviceSetup};
pub use generate::{
    derive_seed, Finish, Generation, GenerationRequest, SamplingParams, MIN_SHARED_PREFIX,
};
pub use loader::{load, LoadedModel};
pub use lora::LoraConfig;
pub use losses::{masked_mean, masked_mean_per_row, masked_sum, sft_loss, token_logprobs};
pub use optim::{accumulate, clip_grad_norm, AdamW, AdamWConfig, LrSchedule, Schedule};
pub use tokenizer::Tokenizer;
pub use transformer::Transformer;
