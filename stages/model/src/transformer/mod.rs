//! Our own Llama/Qwen2 decoder, with a differentiable train mode and a fused, cached eval mode,
//! and the LoRA adapters and full fine-tuning switches that make it trainable.
//!
//! The files, from the bottom up: `config` (the shape, read from `config.json` or GGUF
//! metadata), `weight` (a frozen or trainable parameter, and the two modes), `pass` (what one
//! forward pass hands every layer), `lora` (adapter config and an adapted linear's maths),
//! `linear` (a projection and the kernel each pass picks for it), `kv_cache`, `layers` (one
//! decoder layer), `model` (the decoder's weights and construction), `forward` (the passes),
//! `head` (the output projection), `finetune` (attach/merge LoRA, full fine-tuning).
//! Each file uses only those before it in that list, so there is no import circle.
//!
//! Who may call it: everything above the kernels (`generate`, `score`, `losses`' callers,
//! `weights`, `bench`, the stages crate through the re-exports). It calls `ops`, never the
//! other way round. To add an architecture: its switches in `config`, its differences in
//! `layers` (and `model::from_tensors` for new weights).

pub mod config;
mod finetune;
mod forward;
mod head;
mod kv_cache;
mod layers;
mod linear;
pub mod lora;
mod model;
mod pass;
mod weight;

pub use config::{Arch, Llama3RopeScaling, ModelConfig};
pub use forward::PositionScores;
pub use lora::{LoraConfig, LINEAR_MODULES};
pub use model::{parameter_shapes, Transformer};

pub(crate) use kv_cache::KvCache;
pub(crate) use weight::Mode;
