//! The shape of a Llama/Qwen2-family model, read from an HF `config.json` or GGUF metadata.
//!
//! One struct covers both architectures: they differ only in switches (Qwen2's q/k/v bias, the
//! Llama-3 RoPE frequency scaling, tied embeddings), so the transformer is one file with these
//! switches rather than two near-copies.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// Llama 3.1+ "llama3" RoPE scaling: low frequencies are divided by `factor`, high ones kept,
/// with a smooth blend between (transformers' `_compute_llama3_parameters`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub max_position: usize,
    /// GPT-J style RoPE over adjacent pairs (llama.cpp's permuted q/k layout). Our loaders
    /// un-permute GGUF weights into HF layout and leave this false, so saved adapters and weights
    /// use HF names and layout; it exists for weights that are kept permuted.
    pub rope_interleaved: bool,
}

/// Rotary tables beyond this many positions are not precomputed (Llama-3.2 claims 131072, which
/// would cost 64 MB of tables per model for contexts nobody runs here).
pub const MAX_ROPE_TABLE: usize = 32768;

impl ModelConfig {
    /// A small random-weight model with the real architecture (GQA, tied embeddings for Llama,
    /// q/k/v bias for Qwen2, Llama-3 rope scaling for Llama), for fast tests.
    pub fn tiny(arch: Arch) -> Self {
        ModelConfig {
            arch,
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: match arch {
                Arch::Llama => Some(Llama3RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position: 64,
                }),
                Arch::Qwen2 => None,
            },
            tie_embeddings: arch == Arch::Llama,
            qkv_bias: arch == Arch::Qwen2,
            max_position: 512,
            rope_interleaved: false,
        }
    }

    /// The published shapes of models benchmarked with random weights (`emflow bench model
    /// --random NAME`), so speed and memory can be measured where the weights are not at hand.
    pub fn named_shape(name: &str) -> Option<Self> {
        let base = |arch: Arch| ModelConfig {
            max_position: 8192,
            rope_scaling: None,
            rope_interleaved: false,
            ..ModelConfig::tiny(arch)
        };
        Some(match name {
            "smollm2-135m" => ModelConfig {
                vocab_size: 49152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                rope_theta: 100_000.0,
                tie_embeddings: true,
                ..base(Arch::Llama)
            },
            "qwen2.5-0.5b" => ModelConfig {
                vocab_size: 151_936,
                hidden_size: 896,
                intermediate_size: 4864,
                num_layers: 24,
                num_heads: 14,
                num_kv_heads: 2,
                head_dim: 64,
                rms_eps: 1e-6,
                rope_theta: 1_000_000.0,
                tie_embeddings: true,
                qkv_bias: true,
                ..base(Arch::Qwen2)
            },
            _ => return None,
        })
    }

    /// Names accepted by [`Self::named_shape`].
    pub const NAMED_SHAPES: [&'static str; 2] = ["smollm2-135m", "qwen2.5-0.5b"];

    /// Parse an HF `config.json` (model_type `llama` or `qwen2`).
    pub fn from_hf_json(json: &Json) -> Result<Self> {
        let model_type = json
            .get("model_type")
            .and_then(Json::as_str)
            .context("config.json has no \"model_type\"")?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => bail!(
                "config.json model_type {other:?} is not supported: emflow runs the llama and qwen2 families"
            ),
        };
        let usize_field = |name: &str| -> Result<usize> {
            json.get(name)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .with_context(|| format!("config.json lacks the integer field {name:?}"))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        let num_kv_heads = usize_field("num_key_value_heads").unwrap_or(num_heads);
        let head_dim = match json.get("head_dim").and_then(Json::as_u64) {
            Some(d) => d as usize,
            None => hidden_size / num_heads,
        };
        let rope_scaling = match json.get("rope_scaling") {
            None | Some(Json::Null) => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Json::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |name: &str| -> Result<f64> {
                            s.get(name)
                                .and_then(Json::as_f64)
                                .with_context(|| format!("config.json rope_scaling lacks {name:?}"))
                        };
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position: f("original_max_position_embeddings")? as usize,
                        })
                    }
                    other => bail!(
                        "config.json rope_scaling type {other:?} is not supported (only \"llama3\")"
                    ),
                }
            }
        };
        if let Some(act) = json.get("hidden_act").and_then(Json::as_str) {
            if act != "silu" {
                bail!("config.json hidden_act {act:?} is not supported (only silu)");
            }
        }
        Ok(ModelConfig {
            arch,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_eps: json
                .get("rms_norm_eps")
                .and_then(Json::as_f64)
                .context("config.json lacks \"rms_norm_eps\"")?,
            rope_theta: json
                .get("rope_theta")
                .and_then(Json::as_f64)
                .unwrap_or(10_000.0),
            rope_scaling,
            tie_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            qkv_bias: match arch {
                Arch::Qwen2 => true,
                Arch::Llama => json
                    .get("attention_bias")
                    .and_then(Json::as_bool)
                    .unwrap_or(false),
            },
            max_position: usize_field("max_position_embeddings").unwrap_or(4096),
            rope_interleaved: false,
        })
    }

    /// Read the shape from GGUF metadata; `has_output` says whether the file carries its own
    /// `output.weight` (otherwise the embedding is tied).
    pub fn from_gguf_metadata(
        md: &HashMap<String, gguf_file::Value>,
        has_output: bool,
    ) -> Result<Self> {
        let arch_name = md
            .get("general.architecture")
            .context("GGUF metadata lacks general.architecture")?
            .to_string()
            .context("general.architecture is not a string")?
            .clone();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => bail!(
                "GGUF architecture {other:?} is not supported: emflow runs llama and qwen2 GGUF files"
            ),
        };
        let get =
            |key: &str| -> Option<&gguf_file::Value> { md.get(&format!("{arch_name}.{key}")) };
        let get_u32 = |key: &str| -> Result<usize> {
            get(key)
                .with_context(|| format!("GGUF metadata lacks {arch_name}.{key}"))?
                .to_u32()
                .map(|v| v as usize)
                .with_context(|| format!("GGUF metadata {arch_name}.{key} is not a u32"))
        };
        let get_f32 = |key: &str| -> Result<Option<f64>> {
            match get(key) {
                None => Ok(None),
                Some(v) => Ok(Some(
                    v.to_f32()
                        .with_context(|| format!("GGUF metadata {arch_name}.{key} is not an f32"))?
                        as f64,
                )),
            }
        };
        let hidden_size = get_u32("embedding_length")?;
        let num_heads = get_u32("attention.head_count")?;
        let num_kv_heads = get_u32("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = get_u32("attention.key_length")
            .or_else(|_| get_u32("rope.dimension_count"))
            .unwrap_or(hidden_size / num_heads);
        let vocab_size = match get_u32("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .context("GGUF metadata has neither a vocab_size nor tokenizer.ggml.tokens")?
                .to_vec()
                .context("tokenizer.ggml.tokens is not an array")?
                .len(),
        };
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: get_u32("feed_forward_length")?,
            num_layers: get_u32("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_eps: get_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: get_f32("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling: None,
            tie_embeddings: !has_output,
            qkv_bias: arch == Arch::Qwen2,
            max_position: get_u32("context_length").unwrap_or(4096),
            rope_interleaved: false,
        })
    }

    /// Check the internal consistency a forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            bail!(
                "model config: {} attention heads cannot be grouped over {} key/value heads",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "model config: head_dim {} must be even for RoPE",
                self.head_dim
            );
        }
        Ok(())
    }

    /// RoPE inverse frequencies in f32, as transformers and candle compute them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let theta = self.rope_theta as f32;
        let base = (0..d)
            .step_by(2)
            .map(move |i| 1f32 / theta.powf(i as f32 / d as f32));
        match &self.rope_scaling {
            None => base.collect(),
            Some(s) => {
                let factor = s.factor as f32;
                let (low, high) = (s.low_freq_factor as f32, s.high_freq_factor as f32);
                let orig = s.original_max_position as f32;
                let low_freq_wavelen = orig / low;
                let high_freq_wavelen = orig / high;
                base.map(|freq| {
                    let wavelen = 2. * std::f32::consts::PI / freq;
                    if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (orig / wavelen - low) / (high - low);
                        (1. - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
            }
        }
    }

    /// Number of positions with precomputed rotary tables.
    pub fn rope_table_len(&self) -> usize {
        self.max_position.clamp(1, MAX_ROPE_TABLE)
    }
}

impl ModelConfig {
    /// An HF `config.json` describing this model, so a folder written by `save_full` loads in
    /// transformers and in emflow's HF loader.
    pub fn to_hf_json(&self) -> Json {
        let (model_type, architecture) = match self.arch {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        };
        let rope_scaling = match &self.rope_scaling {
            None => Json::Null,
            Some(s) => serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position,
            }),
        };
        serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.qkv_bias,
            "max_position_embeddings": self.max_position,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }
}
