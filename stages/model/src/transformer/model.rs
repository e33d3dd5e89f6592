//! The decoder itself: its weights by HF name, how it is built (from tensors, or random in a
//! published shape) and the RoPE tables it owns. The forward passes are in `forward`, the
//! output head in `head`, the layers in `layers`, the training switches in `finetune`.
//!
//! candle-transformers' models cannot be trained as shipped: their fused rms_norm, rope and
//! softmax kernels record no backward op, so gradients stop silently; they also return only the
//! last position's logits and know no padding. This is one compact decoder for both families
//! (Qwen2 differs by q/k/v bias; Llama-3 by RoPE frequency scaling).

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::seed::{self, Purpose};
use rand_chacha::ChaCha8Rng;

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::layers::Block;
use super::linear::Linear;
use super::lora::{LoraConfig, LINEAR_MODULES};
use super::weight::Weight;
use crate::device::DeviceSetup;
use crate::ops::decode::PanelCache;

pub struct Transformer {
    pub(crate) cfg: ModelConfig,
    pub(crate) device: Device,
    /// Compute dtype (activations, frozen weights).
    pub(crate) dtype: DType,
    pub(crate) embed: Weight,
    pub(crate) layers: Vec<Block>,
    pub(crate) final_norm: Weight,
    /// The output projection, transposed to (hidden, vocab); None when tied to the embedding.
    pub(crate) lm_head_t: Option<Weight>,
    /// A transposed copy of a frozen tied embedding, so the output projection gets the fast
    /// matmul layout; None when untied or when the embedding is trainable.
    pub(crate) embed_t: Option<Tensor>,
    /// The frozen output projection's packed copy for decode steps (see `linear::FEW_ROWS`).
    pub(super) head_panels: PanelCache,
    /// (positions, head_dim/2) f32 rotary tables.
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(crate) lora: Option<LoraConfig>,
    pub(crate) lora_enabled: bool,
    /// Source of LoRA dropout masks (train mode only, when dropout > 0).
    pub(crate) dropout_rng: Mutex<ChaCha8Rng>,
    /// Recorded in saved adapters as `base_model_name_or_path`.
    pub(crate) base_model_name: String,
}

impl Transformer {
    /// Build from HF-named tensors (consumed); every weight starts frozen.
    pub fn from_tensors(
        cfg: ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        setup: &DeviceSetup,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Weight> {
            let t = tensors
                .remove(name)
                .with_context(|| format!("the weights have no tensor {name:?}"))?;
            if t.dims() != shape {
                bail!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    t.dims()
                );
            }
            let t = t.to_device(&setup.device)?.to_dtype(setup.compute_dtype)?;
            // Matrices other than the embedding are held transposed (see `Linear`).
            Ok(Weight::Frozen(
                if shape.len() == 2 && name != "model.embed_tokens.weight" {
                    t.t()?.contiguous()?
                } else {
                    t
                },
            ))
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_heads * hd;
        let kv_out = cfg.num_kv_heads * hd;
        let embed = take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let weight_t = take(&format!("{p}.{name}.weight"), &[out, inp])?;
                let bias = if bias {
                    Some(take(&format!("{p}.{name}.bias"), &[out])?)
                } else {
                    None
                };
                Ok(Linear::new(weight_t, bias))
            };
            let q = linear("self_attn.q_proj", q_out, h, cfg.qkv_bias)?;
            let k = linear("self_attn.k_proj", kv_out, h, cfg.qkv_bias)?;
            let v = linear("self_attn.v_proj", kv_out, h, cfg.qkv_bias)?;
            let o = linear("self_attn.o_proj", h, q_out, false)?;
            let gate = linear("mlp.gate_proj", cfg.intermediate_size, h, false)?;
            let up = linear("mlp.up_proj", cfg.intermediate_size, h, false)?;
            let down = linear("mlp.down_proj", h, cfg.intermediate_size, false)?;
            layers.push(Block {
                input_norm: take(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let final_norm = take("model.norm.weight", &[h])?;
        let lm_head_t = if cfg.tie_embeddings {
            None
        } else {
            Some(take("lm_head.weight", &[cfg.vocab_size, h])?)
        };
        let (cos, sin) = rope_tables(&cfg, &setup.device)?;
        let mut model = Transformer {
            cfg,
            device: setup.device.clone(),
            dtype: setup.compute_dtype,
            embed,
            layers,
            final_norm,
            lm_head_t,
            embed_t: None,
            head_panels: PanelCache::default(),
            cos,
            sin,
            lora: None,
            lora_enabled: true,
            // Replaced by `add_lora`; an adapter loaded from a file keeps this stream.
            dropout_rng: Mutex::new(seed::stream(Purpose::LoadedAdapterDropout)),
            base_model_name: String::new(),
        };
        model.refresh_embed_t()?;
        Ok(model)
    }

    /// Recompute the transposed copy of a frozen tied embedding after the embedding changed.
    pub(crate) fn refresh_embed_t(&mut self) -> Result<()> {
        self.embed_t = match (&self.embed, self.lm_head_t.is_none()) {
            (Weight::Frozen(e), true) => Some(e.t()?.contiguous()?),
            _ => None,
        };
        Ok(())
    }

    /// Random weights (uniform, deterministic in `seed`) with the real architecture, for tests
    /// and benchmarks.
    pub fn random(cfg: &ModelConfig, setup: &DeviceSetup, seed: u64) -> Result<Self> {
        let mut rng: ChaCha8Rng = seed::stream(Purpose::RandomWeights { seed });
        let mut tensors = HashMap::new();
        for (name, shape) in parameter_shapes(cfg) {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight");
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    let u: f32 = rng.random_range(-0.1..0.1);
                    if is_norm {
                        1.0 + u
                    } else {
                        u
                    }
                })
                .collect();
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(cfg.clone(), tensors, setup)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// Name written as `base_model_name_or_path` into saved adapters.
    pub fn set_base_model_name(&mut self, name: impl Into<String>) {
        self.base_model_name = name.into();
    }

    /// Every parameter by HF name in HF layout, detached, in its stored dtype (a tied
    /// `lm_head` is omitted).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.named_weight_refs()
            .into_iter()
            .map(|(n, w, transposed)| {
                let t = w.detached();
                Ok((n, if transposed { t.t()?.contiguous()? } else { t }))
            })
            .collect()
    }

    /// Every parameter by HF name, with whether it is held transposed relative to HF layout.
    pub(crate) fn named_weight_refs(&self) -> Vec<(String, &Weight, bool)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed, false)];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &layer.input_norm,
                false,
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &layer.post_norm,
                false,
            ));
            for (parent, module) in LINEAR_MODULES {
                if let Some(lin) = layer.linear(module) {
                    out.push((format!("{p}.{parent}.{module}.weight"), &lin.weight_t, true));
                    if let Some(b) = &lin.bias {
                        out.push((format!("{p}.{parent}.{module}.bias"), b, false));
                    }
                }
            }
        }
        out.push(("model.norm.weight".to_string(), &self.final_norm, false));
        if let Some(head) = &self.lm_head_t {
            out.push(("lm_head.weight".to_string(), head, true));
        }
        out
    }

    /// Mutable access to a parameter by HF name, with whether it is held transposed.
    pub(crate) fn weight_mut(&mut self, name: &str) -> Option<(&mut Weight, bool)> {
        match name {
            "model.embed_tokens.weight" => return Some((&mut self.embed, false)),
            "model.norm.weight" => return Some((&mut self.final_norm, false)),
            "lm_head.weight" => return self.lm_head_t.as_mut().map(|w| (w, true)),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (idx, rest) = rest.split_once('.')?;
        let layer = self.layers.get_mut(idx.parse::<usize>().ok()?)?;
        match rest {
            "input_layernorm.weight" => return Some((&mut layer.input_norm, false)),
            "post_attention_layernorm.weight" => return Some((&mut layer.post_norm, false)),
            _ => {}
        }
        let (_parent, rest) = rest.split_once('.')?;
        let (module, kind) = rest.split_once('.')?;
        let lin = layer.linear_mut(module)?;
        match kind {
            "weight" => Some((&mut lin.weight_t, true)),
            "bias" => lin.bias.as_mut().map(|b| (b, false)),
            _ => None,
        }
    }

    pub(crate) fn all_weights_mut(&mut self) -> Vec<&mut Weight> {
        let mut out: Vec<&mut Weight> = vec![&mut self.embed, &mut self.final_norm];
        if let Some(h) = self.lm_head_t.as_mut() {
            out.push(h);
        }
        for layer in self.layers.iter_mut() {
            out.extend(layer.weights_mut());
        }
        out
    }

    /// A KV cache for `batch` rows and `capacity` slots, its first slots holding `prefix`'s
    /// keys and values (a one-row cache) in every row when given.
    pub(crate) fn kv_cache(
        &self,
        prefix: Option<&KvCache>,
        batch: usize,
        capacity: usize,
    ) -> Result<KvCache> {
        KvCache::starting_with(
            prefix,
            &self.cfg,
            (self.dtype, &self.device),
            batch,
            capacity,
        )
    }
}

/// HF parameter names and shapes of a model with this config.
pub fn parameter_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (name, o, i_) in [
            ("self_attn.q_proj", q_out, h),
            ("self_attn.k_proj", kv_out, h),
            ("self_attn.v_proj", kv_out, h),
            ("self_attn.o_proj", h, q_out),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ] {
            out.push((format!("{p}.{name}.weight"), vec![o, i_]));
            if cfg.qkv_bias
                && matches!(
                    name,
                    "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj"
                )
            {
                out.push((format!("{p}.{name}.bias"), vec![o]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// (positions, head_dim/2) cos and sin tables in f32.
fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq = cfg.inv_freq();
    let n = cfg.rope_table_len();
    let inv = Tensor::from_vec(inv_freq.clone(), (1, inv_freq.len()), device)?;
    let pos = Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let angles = pos.matmul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}
