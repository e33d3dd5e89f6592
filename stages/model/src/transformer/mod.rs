//! Our own decoder for the Llama family (Llama 2/3, Qwen2, Qwen3, Phi-3/Phi-4), with a
//! differentiable train mode and a fused, cached eval mode, and the LoRA adapters and full
//! fine-tuning switches that make it trainable.
//!
//! The files, from the bottom up: `config` (the shape and the architecture's switches, GGUF
//! metadata), `config_hf` (an HF `config.json`, read strictly), `weight` (a frozen or trainable
//! parameter, and the two modes), `pass` (what one forward pass hands every layer), `lora`
//! (adapter config, which projections a target names, an adapted linear's maths), `linear` (a
//! projection and the kernel each pass picks for it), `kv_cache`, `layers` (one decoder layer),
//! `model` (the decoder's weights and construction), `steering` (a vector added at one layer's
//! output in training passes), `forward` (the passes), `head` (the output projection),
//! `checkpoint` (one training pass and its backward, optionally recomputing activations layer
//! by layer), `finetune` (attach/merge LoRA, full fine-tuning).
//! Each file uses only those before it in that list, so there is no import circle.
//!
//! Who may call it: everything above the kernels (`generate`, `score`, `losses`' callers,
//! `weights`, `bench`, the stages crate through the re-exports). It calls `ops`, never the
//! other way round. To add an architecture: its switches in `config` (and `config_hf`), its
//! differences in `layers` (and `model::layer_from_tensors` and `parameter_shapes` for new
//! weights).

mod checkpoint;
pub mod config;
mod config_hf;
mod finetune;
mod forward;
mod head;
mod kv_cache;
mod layers;
mod linear;
pub mod lora;
mod model;
mod pass;
mod steering;
mod weight;

pub use config::{Arch, Llama3RopeScaling, ModelConfig};
pub use forward::{PositionScores, TrainPass};
pub use lora::{linear_modules, LoraConfig, FUSED_LINEAR_MODULES, LINEAR_MODULES};
pub use model::{parameter_shapes, Transformer};
pub use steering::Steering;

pub(crate) use kv_cache::KvCache;
pub(crate) use weight::Mode;
