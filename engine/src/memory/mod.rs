//! GPU memory per stage, estimated before anything runs: weights + adapter + optimiser state +
//! activations (with and without activation checkpointing) + the KV cache of sampling, for the
//! model's shape at the stage's batch and sequence length. `emflow run --dry-run` and
//! `emflow plan` print it per training/eval stage; a plan whose estimate exceeds the device
//! memory (`resources: { gpu_memory: 24GiB }`, else what `nvidia-smi` reports when running)
//! is refused with what to change.
//!
//! Kinds declare what they hold on the device ([`MemoryDemand`], from
//! [`crate::kind::StageKind::memory_demand`]); the engine knows the model's shape
//! ([`ModelShape`]) without downloading it: `config.json` of a local or already-fetched HF
//! folder, else `shape:` in the manifest's model entry (a built-in name, [`BUILTIN_SHAPES`], or
//! config.json's own field names with numbers). The arithmetic is written here rather than
//! taken from a crate: no Rust crate models LoRA training memory, and the terms are few.
//!
//! What the numbers assume (docs/memory.md says the same for users):
//! - weights in the kind's CUDA dtype (bf16: 2 bytes a parameter);
//! - trainable parameters (LoRA A/B, or every weight for full fine-tuning) in f32 with an f32
//!   gradient and AdamW's two f32 moments: 16 bytes each for LoRA; full fine-tuning keeps the
//!   bf16 weights plus 12 bytes of gradient and moments per parameter;
//! - eager attention (no flash attention): the score and probability matrices of a layer are
//!   saved for the backward pass, heads x sequence^2 each;
//! - with checkpointing, each layer keeps only its input; one layer's activations are rebuilt
//!   at a time during the backward pass;
//! - logits and their log-softmax in f32 for the whole micro-batch;
//! - sampling holds a KV cache of every sequence in flight at its full length;
//! - [`RUNTIME_OVERHEAD`] for the CUDA context and allocator slack.

mod plan;

pub use plan::{MemoryPlan, StageMemory};

use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

/// CUDA context, cuBLAS workspace and allocator slack: what a process holds beyond its
/// tensors (about 0.5-1 GiB on recent drivers; the upper end, so a plan that fits here fits).
pub const RUNTIME_OVERHEAD: u64 = 1 << 30;

/// The numbers of a decoder-only transformer that memory depends on, named as in
/// transformers' `config.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelShape {
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
    /// Where the shape came from, for the printed estimate (`config.json of ...`, `qwen3-14b`).
    pub origin: String,
}

/// The paper's three models and the local default, with the numbers of their `config.json`
/// (Qwen/Qwen3-14B, microsoft/phi-4, deepseek-ai/DeepSeek-R1-Distill-Llama-8B,
/// HuggingFaceTB/SmolLM2-135M-Instruct): name, hidden, intermediate, layers, heads, key/value
/// heads, head_dim, vocabulary, tied embeddings.
pub const BUILTIN_SHAPES: &[(&str, [u64; 7], bool)] = &[
    ("qwen3-14b", [5120, 17408, 40, 40, 8, 128, 151_936], false),
    ("phi-4", [5120, 17920, 40, 40, 10, 128, 100_352], false),
    (
        "deepseek-r1-distill-llama-8b",
        [4096, 14336, 32, 32, 8, 128, 128_256],
        false,
    ),
    ("smollm2-135m", [576, 1536, 30, 9, 3, 64, 49_152], true),
];

impl ModelShape {
    /// A built-in shape by name (see [`BUILTIN_SHAPES`]).
    pub fn builtin(name: &str) -> anyhow::Result<ModelShape> {
        let Some((_, n, tied)) = BUILTIN_SHAPES.iter().find(|(k, _, _)| *k == name) else {
            let names: Vec<&str> = BUILTIN_SHAPES.iter().map(|(k, _, _)| *k).collect();
            bail!(
                "unknown model shape `{name}`; built-in shapes are {}, or give config.json's \
                 numbers as a mapping (hidden_size, intermediate_size, num_hidden_layers, \
                 num_attention_heads, num_key_value_heads, head_dim, vocab_size)",
                names.join(", ")
            );
        };
        Ok(ModelShape {
            hidden_size: n[0],
            intermediate_size: n[1],
            num_hidden_layers: n[2],
            num_attention_heads: n[3],
            num_key_value_heads: n[4],
            head_dim: n[5],
            vocab_size: n[6],
            tie_word_embeddings: *tied,
            origin: format!("shape `{name}`"),
        })
    }

    /// The shape a manifest's `shape:` declares: a built-in name, or a mapping with
    /// config.json's field names.
    pub fn from_decl(decl: &Value) -> anyhow::Result<ModelShape> {
        match decl {
            Value::String(name) => ModelShape::builtin(name),
            Value::Object(_) => ModelShape::from_config(decl, "the manifest's `shape:`"),
            other => bail!("`shape` must be a built-in name or a mapping, not {other}"),
        }
    }

    /// Reads `config.json` fields; `num_key_value_heads` defaults to the head count and
    /// `head_dim` to hidden / heads, as in transformers.
    pub fn from_config(config: &Value, origin: &str) -> anyhow::Result<ModelShape> {
        let field = |name: &str| -> anyhow::Result<Option<u64>> {
            match config.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().filter(|&n| n > 0).map(Some).ok_or_else(|| {
                    anyhow!("{origin}: `{name}` must be a positive whole number, not {v}")
                }),
            }
        };
        let need = |name: &str| -> anyhow::Result<u64> {
            field(name)?.ok_or_else(|| anyhow!("{origin}: `{name}` is missing"))
        };
        let hidden_size = need("hidden_size")?;
        let num_attention_heads = need("num_attention_heads")?;
        Ok(ModelShape {
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: field("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim: field("head_dim")?.unwrap_or(hidden_size / num_attention_heads),
            vocab_size: need("vocab_size")?,
            tie_word_embeddings: config
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            origin: origin.to_string(),
        })
    }

    /// The shape in an HF folder's `config.json`; `None` when the folder has none (a GGUF
    /// file, say).
    pub fn from_hf_dir(dir: &Path) -> anyhow::Result<Option<ModelShape>> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let config: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ModelShape::from_config(&config, &format!("{}", path.display())).map(Some)
    }

    /// Inputs and outputs of each linear layer LoRA may target, by its short name.
    fn linear(&self, target: &str) -> Option<(u64, u64)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        Some(match target.trim_end_matches("_proj") {
            "q" => (h, q),
            "k" | "v" => (h, kv),
            "o" => (q, h),
            "gate" | "up" => (h, i),
            "down" => (i, h),
            _ => return None,
        })
    }

    /// Parameters in one layer's linear layers.
    fn layer_linear_params(&self) -> u64 {
        ["q", "k", "v", "o", "gate", "up", "down"]
            .iter()
            .filter_map(|t| self.linear(t))
            .map(|(a, b)| a * b)
            .sum()
    }

    /// Every parameter: embeddings, head (unless tied), layers, norms (q/k norms included as
    /// an upper bound; they are a few hundred numbers).
    pub fn parameters(&self) -> u64 {
        let embed = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let norms = 2 * self.hidden_size + 2 * self.head_dim;
        embed
            + head
            + self.num_hidden_layers * (self.layer_linear_params() + norms)
            + self.hidden_size
    }

    /// Numbers one token keeps alive in one layer for the backward pass, sequence-length
    /// terms apart: norms' inputs and outputs, q/k/v, attention output, MLP intermediates.
    fn saved_per_token_layer(&self) -> u64 {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        4 * h + q + 2 * kv + q + h + 4 * i
    }

    /// Bytes of K and V for one token in every layer.
    fn kv_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes
    }
}

/// What a stage trains.
#[derive(Clone, Debug, PartialEq)]
pub enum Trainable {
    /// LoRA of `rank` on the named linear layers (`q`, `k_proj`, ...) of every layer.
    Lora { rank: u64, targets: Vec<String> },
    /// Every weight.
    Full,
}

/// What a stage holds on the device, as its kind declares it from its params.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryDemand {
    /// `None` for a stage that only samples or scores.
    pub training: Option<Trainable>,
    /// Sequences in one training forward/backward (the micro-batch) and their length in tokens.
    pub train_batch: u64,
    pub train_tokens: u64,
    /// Sequences sampled at once and their length (prompt + new tokens); 0 when none.
    pub sample_batch: u64,
    pub sample_tokens: u64,
    /// Whether the kind is set to recompute activations in the backward pass.
    pub gradient_checkpointing: bool,
    /// The param a user sets to turn checkpointing on (for the refusal's advice).
    pub checkpointing_param: Option<&'static str>,
    /// The params that set the micro-batch and the sequence length (for the advice).
    pub batch_param: &'static str,
    pub length_param: &'static str,
}

/// One stage's estimate, in bytes.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub weights: u64,
    /// Trainable parameters with their gradients and optimiser moments.
    pub trainable: u64,
    pub activations: u64,
    pub activations_checkpointed: u64,
    pub kv_cache: u64,
    pub overhead: u64,
    /// Whether the stage runs with checkpointing (so which activation figure counts).
    pub checkpointing: bool,
}

impl Estimate {
    /// The total with or without checkpointing.
    pub fn total_with(&self, checkpointing: bool) -> u64 {
        let act = if checkpointing {
            self.activations_checkpointed
        } else {
            self.activations
        };
        self.weights + self.trainable + act.max(self.kv_cache) + self.overhead
    }

    /// The total as the stage is set to run.
    pub fn total(&self) -> u64 {
        self.total_with(self.checkpointing)
    }
}

/// The estimate for `demand` on a model of `shape` whose weights take `dtype_bytes` each.
pub fn estimate(
    shape: &ModelShape,
    demand: &MemoryDemand,
    dtype_bytes: u64,
) -> anyhow::Result<Estimate> {
    let weights = shape.parameters() * dtype_bytes;
    let trainable = match &demand.training {
        None => 0,
        Some(Trainable::Full) => shape.parameters() * 12,
        Some(Trainable::Lora { rank, targets }) => {
            let mut per_layer = 0;
            for t in targets {
                let (a, b) = shape.linear(t).ok_or_else(|| {
                    anyhow!("LoRA target `{t}` is not a linear layer of the model")
                })?;
                per_layer += rank * (a + b);
            }
            per_layer * shape.num_hidden_layers * 16
        }
    };
    let (activations, activations_checkpointed) = if demand.training.is_some() {
        training_activations(shape, demand.train_batch, demand.train_tokens, dtype_bytes)
    } else {
        (0, 0)
    };
    let kv_cache =
        demand.sample_batch * demand.sample_tokens * shape.kv_bytes_per_token(dtype_bytes)
            + demand.sample_batch * shape.vocab_size * 4;
    Ok(Estimate {
        weights,
        trainable,
        activations,
        activations_checkpointed,
        kv_cache,
        overhead: RUNTIME_OVERHEAD,
        checkpointing: demand.gradient_checkpointing,
    })
}

/// Saved activations of one micro-batch (`batch` sequences of `tokens`): (without, with)
/// checkpointing. Logits and their log-softmax (f32) are counted in both.
fn training_activations(
    shape: &ModelShape,
    batch: u64,
    tokens: u64,
    dtype_bytes: u64,
) -> (u64, u64) {
    let bt = batch * tokens;
    let attention = 2 * shape.num_attention_heads * batch * tokens * tokens;
    let layer = bt * shape.saved_per_token_layer() + attention;
    let logits = bt * shape.vocab_size * 4 * 2;
    let full = shape.num_hidden_layers * layer * dtype_bytes + logits;
    let inputs_only = shape.num_hidden_layers * bt * shape.hidden_size * dtype_bytes;
    let checkpointed = inputs_only + layer * dtype_bytes + logits;
    (full, checkpointed)
}

/// `12.3 GiB`.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// One line for the plan: the total as set and its parts, with the other checkpointing
/// setting's total for comparison.
pub fn summary_line(e: &Estimate, training: bool) -> String {
    let mut parts = vec![format!("weights {}", gib(e.weights))];
    if training {
        parts.push(format!("adapter+optimiser {}", gib(e.trainable)));
        parts.push(format!("activations {}", gib(e.activations)));
        parts.push(format!("checkpointed {}", gib(e.activations_checkpointed)));
    }
    if e.kv_cache > 0 {
        parts.push(format!("sampling KV {}", gib(e.kv_cache)));
    }
    let other = if training {
        format!(
            "; {} checkpointing: {}",
            if e.checkpointing { "without" } else { "with" },
            gib(e.total_with(!e.checkpointing))
        )
    } else {
        String::new()
    };
    format!(
        "GPU memory ~{} ({}, overhead {}){other}",
        gib(e.total()),
        parts.join(", "),
        gib(e.overhead)
    )
}

/// Why `e` does not fit in `device` bytes, and what to change, as the predicate of a sentence
/// whose subject (one stage, or a family of them) the caller names: "about 210.1 GiB of GPU
/// memory but the device has 24.0 GiB: ..."; `None` when it fits.
pub fn refusal(e: &Estimate, demand: &MemoryDemand, device: u64) -> Option<String> {
    if e.total() <= device {
        return None;
    }
    let mut advice = Vec::new();
    if let Some(param) = demand.checkpointing_param.filter(|_| !e.checkpointing) {
        let with = e.total_with(true);
        advice.push(format!(
            "set `{param}: true` ({} with checkpointing{})",
            gib(with),
            if with <= device {
                ", which fits"
            } else {
                ", still too much"
            }
        ));
    }
    if matches!(demand.training, Some(Trainable::Full)) {
        advice.push("train a LoRA adapter instead of every weight (`lora: {r: 32, ...}`)".into());
    }
    advice.push(format!(
        "lower `{}` or `{}`",
        demand.batch_param, demand.length_param
    ));
    advice.push(format!(
        "or run on a device with at least {} (`resources: {{ gpu_memory: ... }}`)",
        gib(e.total())
    ));
    Some(format!(
        "about {} of GPU memory but the device has {}: {}",
        gib(e.total()),
        gib(device),
        advice.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in shapes' parameter counts are the models' published sizes.
    #[test]
    fn builtin_shapes_count_the_published_parameters() {
        let billions = |name: &str| ModelShape::builtin(name).unwrap().parameters() as f64 / 1e9;
        assert!(
            (billions("qwen3-14b") - 14.77).abs() < 0.05,
            "{}",
            billions("qwen3-14b")
        );
        assert!(
            (billions("phi-4") - 14.66).abs() < 0.05,
            "{}",
            billions("phi-4")
        );
        let r1 = billions("deepseek-r1-distill-llama-8b");
        assert!((r1 - 8.03).abs() < 0.05, "{r1}");
        let smol = billions("smollm2-135m");
        assert!((smol - 0.1348).abs() < 0.002, "{smol}");
    }

    fn sft(training: Trainable, checkpointing: bool) -> MemoryDemand {
        MemoryDemand {
            training: Some(training),
            train_batch: 4,
            train_tokens: 2048,
            sample_batch: 0,
            sample_tokens: 0,
            gradient_checkpointing: checkpointing,
            checkpointing_param: Some("gradient_checkpointing"),
            batch_param: "batch_size",
            length_param: "max_length",
        }
    }

    #[test]
    fn full_fine_tuning_of_14b_on_24_gib_is_refused_with_advice() {
        let shape = ModelShape::builtin("qwen3-14b").unwrap();
        let demand = sft(Trainable::Full, false);
        let e = estimate(&shape, &demand, 2).unwrap();
        // 14.8e9 parameters x (2 + 12) bytes alone is ~190 GiB.
        assert!(e.weights + e.trainable > 190 << 30);
        let why = refusal(&e, &demand, 24 << 30).unwrap();
        assert!(why.contains("instead of every weight"), "{why}");
        assert!(why.contains("gradient_checkpointing: true"), "{why}");
    }

    #[test]
    fn checkpointing_shrinks_activations_and_lora_state_is_small() {
        let shape = ModelShape::builtin("qwen3-14b").unwrap();
        let lora = Trainable::Lora {
            rank: 32,
            targets: ["q", "k", "v", "o", "gate", "up", "down"]
                .map(String::from)
                .to_vec(),
        };
        let e = estimate(&shape, &sft(lora, false), 2).unwrap();
        assert!(e.activations_checkpointed * 4 < e.activations);
        // rank 32 on all linears of Qwen3-14B: 40 x 3.21M parameters x 16 bytes ~ 1.9 GiB.
        assert_eq!(e.trainable, 40 * 3_211_264 * 16);
        assert!(e.total_with(true) < e.total_with(false));
    }

    #[test]
    fn config_json_fields_read_with_transformers_defaults() {
        let config = serde_json::json!({
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 256
        });
        let s = ModelShape::from_config(&config, "test").unwrap();
        assert_eq!(
            (s.num_key_value_heads, s.head_dim, s.tie_word_embeddings),
            (4, 16, false)
        );
        let bad = serde_json::json!({ "hidden_size": -1 });
        let err = ModelShape::from_config(&bad, "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hidden_size"), "{err}");
        assert!(ModelShape::from_decl(&Value::String("gpt-5".into())).is_err());
    }
}
