//! The shape of a model of the Llama family (Llama, Qwen2, Qwen3, Phi-3), read from an HF
//! `config.json` (`config_hf`) or GGUF metadata (here).
//!
//! One struct covers every architecture: they differ only in switches (Qwen2's q/k/v bias,
//! Qwen3's per-head q/k norms, Phi-3's fused projections, the Llama-3 RoPE frequency scaling,
//! tied embeddings), so the transformer is one set of files with these switches rather than a
//! near-copy per model.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen2 without the q/k/v bias, with an RMSNorm over each query and key head before RoPE.
    Qwen3,
    /// `Phi3ForCausalLM` (Phi-3, Phi-4): Llama with q/k/v fused into `qkv_proj` and gate/up
    /// into `gate_up_proj`.
    Phi3,
}

impl Arch {
    /// Qwen3's `q_norm`/`k_norm`: an RMSNorm over each head of the queries and keys.
    pub fn has_qk_norm(self) -> bool {
        self == Arch::Qwen3
    }

    /// Phi-3's fused `qkv_proj` and `gate_up_proj` in place of q/k/v and gate/up.
    pub fn fused_projections(self) -> bool {
        self == Arch::Phi3
    }

    /// transformers' `model_type` and architecture class.
    pub fn hf_names(self) -> (&'static str, &'static str) {
        match self {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
            Arch::Phi3 => ("phi3", "Phi3ForCausalLM"),
        }
    }
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
    /// A small random-weight model with the real architecture (GQA, tied embeddings for Llama
    /// and Qwen3, q/k/v bias for Qwen2, Llama-3 rope scaling for Llama, Qwen3's head_dim unlike
    /// hidden / heads, Phi-3's fused projections), for fast tests.
    pub fn tiny(arch: Arch) -> Self {
        ModelConfig {
            arch,
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: if arch == Arch::Qwen3 { 24 } else { 16 },
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: match arch {
                Arch::Llama => Some(Llama3RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position: 64,
                }),
                Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 => None,
            },
            tie_embeddings: matches!(arch, Arch::Llama | Arch::Qwen3),
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
                "GGUF architecture {other:?} is not supported: emflow runs llama and qwen2 GGUF files \
                 (load other models from their HF-format folder)"
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
