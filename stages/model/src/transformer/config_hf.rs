//! An HF `config.json` to a [`ModelConfig`] and back, strictly.
//!
//! Field names and meanings are transformers 5.24's (`configuration_llama.py`, `_qwen2`,
//! `_qwen3`, `_phi3`, `modeling_rope_utils.py`). Both spellings of RoPE are read: transformers
//! 5 writes `rope_parameters` (with `rope_theta` inside), older versions a top-level
//! `rope_theta` and `rope_scaling`; transformers itself prefers `rope_scaling` when both exist.
//! A field that would change the maths and that emflow does not implement (a rope type other
//! than default/llama3, a sliding window, partial rotary, another activation, biases Llama-style
//! models may switch on, dropout, quantised weights) is an error naming the field; the caller
//! adds the file. Defaults are transformers' own per architecture (e.g. Qwen3's head_dim is 128
//! when absent, not hidden / heads), never emflow's guesses.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value as Json};

use super::config::{Arch, Llama3RopeScaling, ModelConfig};

/// transformers' `default_theta`, used when a config names no `rope_theta` anywhere.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// The keys a (flat) RoPE dict may hold; any other is refused.
const ROPE_KEYS: [&str; 8] = [
    "rope_type",
    "type",
    "rope_theta",
    "partial_rotary_factor",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
];

/// How a config sets up RoPE.
struct Rope {
    theta: f64,
    scaling: Option<Llama3RopeScaling>,
}

impl ModelConfig {
    /// Parse an HF `config.json` (model_type `llama`, `qwen2`, `qwen3` or `phi3`).
    pub fn from_hf_json(json: &Json) -> Result<Self> {
        let arch = arch_of(json)?;
        refuse_unsupported(json, arch)?;
        let usize_field = |name: &str| -> Result<usize> {
            json.get(name)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .with_context(|| format!("config.json lacks the integer field {name:?}"))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        let max_position = usize_field("max_position_embeddings").unwrap_or(4096);
        let head_dim = match (non_null(json, "head_dim"), arch) {
            (Some(d), _) => d
                .as_u64()
                .context("config field \"head_dim\" is not an integer")?
                as usize,
            // Qwen3Config's own default; the others derive it.
            (None, Arch::Qwen3) => 128,
            (None, _) => hidden_size / num_heads,
        };
        let rope = read_rope(json, arch, max_position)?;
        Ok(ModelConfig {
            arch,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads: usize_field("num_key_value_heads").unwrap_or(num_heads),
            head_dim,
            rms_eps: json
                .get("rms_norm_eps")
                .and_then(Json::as_f64)
                .context("config.json lacks \"rms_norm_eps\"")?,
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            tie_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2,
            max_position,
            rope_interleaved: false,
        })
    }

    /// An HF `config.json` describing this model, so a folder written by `save_full` loads in
    /// transformers and in emflow's HF loader. The older top-level `rope_theta`/`rope_scaling`
    /// spelling, which transformers 5 still reads, keeps the bytes of folders saved before.
    pub fn to_hf_json(&self) -> Json {
        let (model_type, architecture) = self.arch.hf_names();
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

/// The value of `name` unless absent or null.
fn non_null<'a>(json: &'a Json, name: &str) -> Option<&'a Json> {
    json.get(name).filter(|v| !v.is_null())
}

fn arch_of(json: &Json) -> Result<Arch> {
    let model_type = json
        .get("model_type")
        .and_then(Json::as_str)
        .context("config.json has no \"model_type\"")?;
    Ok(match model_type {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "phi3" => Arch::Phi3,
        other => bail!(
            "config field \"model_type\" is {other:?}, which emflow does not run \
             (it runs llama, qwen2, qwen3 and phi3)"
        ),
    })
}

/// Errors for the fields emflow would otherwise read wrong without a word.
fn refuse_unsupported(json: &Json, arch: Arch) -> Result<()> {
    if let Some(act) = non_null(json, "hidden_act") {
        if act.as_str() != Some("silu") {
            bail!("config field \"hidden_act\" is {act}; emflow implements only \"silu\"");
        }
    }
    refuse_sliding_window(json, arch)?;
    // Llama and Qwen3 put this bias on q, k, v and o alike; Phi-3 ignores the field.
    if matches!(arch, Arch::Llama | Arch::Qwen3) && json.get("attention_bias") == Some(&true.into())
    {
        bail!("config field \"attention_bias\" is true (biases on q/k/v/o_proj); emflow implements only attention_bias false for {arch:?}");
    }
    if json.get("mlp_bias") == Some(&true.into()) {
        bail!("config field \"mlp_bias\" is true; emflow implements only MLPs without bias");
    }
    for field in ["attention_dropout", "resid_pdrop", "embd_pdrop"] {
        if non_null(json, field)
            .and_then(Json::as_f64)
            .is_some_and(|p| p != 0.0)
        {
            bail!("config field {field:?} is {}; emflow trains without dropout inside the model, so only 0 is supported", json[field]);
        }
    }
    if non_null(json, "quantization_config").is_some() {
        bail!("config field \"quantization_config\" is set: emflow loads unquantised (f32/bf16/f16) safetensors only");
    }
    Ok(())
}

/// Sliding-window attention: Qwen2/Qwen3 switch it on with `use_sliding_window` (their
/// `sliding_window` is then ignored) or per layer with `layer_types`; Phi-3 (and Mistral-like
/// configs) whenever `sliding_window` is set.
fn refuse_sliding_window(json: &Json, arch: Arch) -> Result<()> {
    if let Some(types) = non_null(json, "layer_types") {
        let all_full = types
            .as_array()
            .is_some_and(|t| t.iter().all(|v| v.as_str() == Some("full_attention")));
        if !all_full {
            bail!("config field \"layer_types\" is {types}; emflow implements only \"full_attention\" layers");
        }
    }
    match arch {
        Arch::Qwen2 | Arch::Qwen3 => {
            if json.get("use_sliding_window") == Some(&true.into()) {
                bail!("config field \"use_sliding_window\" is true; emflow implements only full attention");
            }
        }
        Arch::Llama | Arch::Phi3 => {
            if let Some(w) = non_null(json, "sliding_window") {
                bail!("config field \"sliding_window\" is {w}; emflow implements only full attention (sliding_window null)");
            }
        }
    }
    Ok(())
}

/// RoPE from `rope_scaling` (older configs) or `rope_parameters` (transformers 5), with
/// `rope_theta` and `partial_rotary_factor` inside or at the top level.
fn read_rope(json: &Json, arch: Arch, max_position: usize) -> Result<Rope> {
    let empty = Map::new();
    let (field, dict) = match (
        non_null(json, "rope_scaling"),
        non_null(json, "rope_parameters"),
    ) {
        (Some(d), _) => ("rope_scaling", d),
        (None, Some(d)) => ("rope_parameters", d),
        (None, None) => ("rope_parameters", &Json::Null),
    };
    let dict = match dict {
        Json::Null => &empty,
        Json::Object(m) => m,
        other => bail!("config field {field:?} is {other}, not an object"),
    };
    if let Some(key) = dict.keys().find(|k| !ROPE_KEYS.contains(&k.as_str())) {
        bail!(
            "config field \"{field}.{key}\" is not understood by emflow (a per-layer-type or \
             multimodal RoPE?); it implements flat RoPE settings with the keys {ROPE_KEYS:?}"
        );
    }
    let number = |name: &str| -> Result<Option<f64>> {
        match dict.get(name).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => Ok(Some(v.as_f64().with_context(|| {
                format!("config field \"{field}.{name}\" is {v}, not a number")
            })?)),
        }
    };
    let top = |name: &str| non_null(json, name).and_then(Json::as_f64);
    let partial = number("partial_rotary_factor")?.or_else(|| top("partial_rotary_factor"));
    if let Some(p) = partial.filter(|p| *p != 1.0) {
        bail!("config field \"partial_rotary_factor\" is {p}; emflow implements RoPE over the whole head (1.0) only");
    }
    let theta = number("rope_theta")?
        .or_else(|| top("rope_theta"))
        .unwrap_or(DEFAULT_ROPE_THETA);
    let kind = dict
        .get("rope_type")
        .or_else(|| dict.get("type"))
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
        .unwrap_or_else(|| "default".to_string());
    let scaling = match kind.as_str() {
        "default" => None,
        "llama3" => {
            let need = |name: &str| -> Result<f64> {
                number(name)?.with_context(|| {
                    format!("config field \"{field}\" has rope_type llama3 but no {name:?}")
                })
            };
            // Phi-3 keeps the pretraining length at the top level, and transformers prefers it.
            let original = match (arch, top("original_max_position_embeddings")) {
                (Arch::Phi3, Some(n)) => n,
                _ => number("original_max_position_embeddings")?.unwrap_or(max_position as f64),
            };
            Some(Llama3RopeScaling {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position: original as usize,
            })
        }
        other => bail!(
            "config field \"{field}.rope_type\" is {other:?}; emflow implements the rope types \"default\" and \"llama3\""
        ),
    };
    Ok(Rope { theta, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(model_type: &str) -> Json {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
        })
    }

    fn with(model_type: &str, field: &str, value: Json) -> Json {
        let mut j = base(model_type);
        j[field] = value;
        j
    }

    #[test]
    fn theta_is_read_from_either_spelling() -> Result<()> {
        let new = with(
            "qwen2",
            "rope_parameters",
            serde_json::json!({"rope_type": "default", "rope_theta": 1e6}),
        );
        assert_eq!(ModelConfig::from_hf_json(&new)?.rope_theta, 1e6);
        let old = with("qwen2", "rope_theta", 1e6.into());
        assert_eq!(ModelConfig::from_hf_json(&old)?.rope_theta, 1e6);
        assert_eq!(ModelConfig::from_hf_json(&base("llama"))?.rope_theta, 1e4);
        Ok(())
    }

    #[test]
    fn old_rope_scaling_with_type_key_reads_llama3() -> Result<()> {
        let mut j = with("llama", "rope_theta", 5e5.into());
        j["rope_scaling"] = serde_json::json!({"type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let cfg = ModelConfig::from_hf_json(&j)?;
        assert_eq!(cfg.rope_theta, 5e5);
        assert_eq!(
            cfg.rope_scaling.map(|s| s.original_max_position),
            Some(8192)
        );
        Ok(())
    }

    #[test]
    fn qwen3_head_dim_defaults_like_transformers() -> Result<()> {
        assert_eq!(ModelConfig::from_hf_json(&base("qwen3"))?.head_dim, 128);
        assert_eq!(ModelConfig::from_hf_json(&base("phi3"))?.head_dim, 8);
        Ok(())
    }

    #[test]
    fn unsupported_fields_are_named() {
        let cases = [
            with("llama", "hidden_act", "gelu".into()),
            with("qwen3", "use_sliding_window", true.into()),
            with("phi3", "sliding_window", 2047.into()),
            with("llama", "mlp_bias", true.into()),
            with(
                "llama",
                "rope_scaling",
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            ),
            with(
                "qwen2",
                "rope_parameters",
                serde_json::json!({"mrope_section": [1, 2]}),
            ),
            with("phi3", "partial_rotary_factor", 0.5.into()),
            with("gemma", "hidden_act", "silu".into()),
        ];
        let fields = [
            "hidden_act",
            "use_sliding_window",
            "sliding_window",
            "mlp_bias",
            "rope_scaling.rope_type",
            "rope_parameters.mrope_section",
            "partial_rotary_factor",
            "model_type",
        ];
        for (json, field) in cases.iter().zip(fields) {
            let err = ModelConfig::from_hf_json(json)
                .expect_err(field)
                .to_string();
            assert!(err.contains(&format!("\"{field}\"")), "{field}: {err}");
        }
    }
}
