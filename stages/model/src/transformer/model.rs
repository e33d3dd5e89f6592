//! The decoder itself: its weights by HF name, how it is built (from tensors, or random in a
//! published shape) and the RoPE tables it owns. The forward passes are in `forward`, the
//! output head in `head`, the layers in `layers`, the training switches in `finetune`.
//!
//! candle-transformers' models cannot be trained as shipped: their fused rms_norm, rope and
//! softmax kernels record no backward op, so gradients stop silently; they also return only the
//! last position's logits and know no padding. This is one compact decoder for the whole
//! family (Qwen2 differs by q/k/v bias, Qwen3 by per-head q/k norms, Phi-3 by fused
//! projections, Llama-3 by RoPE frequency scaling).

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::seed::{self, Purpose};
use rand_chacha::ChaCha8Rng;

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::layers::{Block, Projection};
use super::linear::Linear;
use super::lora::{linear_modules, LoraConfig};
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
    /// A shift added at one layer's output in train-mode passes (see `steering`); None = off.
    pub(super) steering: Option<super::steering::Steering>,
    /// Whether an installed steering applies (off for the reference policy's passes).
    pub(super) steering_enabled: bool,
}

impl Transformer {
    /// Build from HF-named tensors (consumed); every weight starts frozen. A tensor the
    /// architecture does not use is an error (it would mean the config was read wrong), except
    /// a tied model's copy of `lm_head.weight` and old checkpoints' rotary `inv_freq` buffers.
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
        let h = cfg.hidden_size;
        let embed = take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let layers = (0..cfg.num_layers)
            .map(|i| layer_from_tensors(&cfg, i, &mut take))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = take("model.norm.weight", &[h])?;
        let lm_head_t = if cfg.tie_embeddings {
            None
        } else {
            Some(take("lm_head.weight", &[cfg.vocab_size, h])?)
        };
        refuse_unused(tensors, &cfg)?;
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
            steering: None,
            steering_enabled: true,
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
            if let Some((q_norm, k_norm)) = &layer.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), q_norm, false));
                out.push((format!("{p}.self_attn.k_norm.weight"), k_norm, false));
            }
            for proj in &layer.projections {
                let (lin, name) = (&proj.linear, format!("{p}.{}.{}", proj.parent, proj.module));
                out.push((format!("{name}.weight"), &lin.weight_t, true));
                if let Some(b) = &lin.bias {
                    out.push((format!("{name}.bias"), b, false));
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
            "self_attn.q_norm.weight" => return layer.qk_norm.as_mut().map(|(q, _)| (q, false)),
            "self_attn.k_norm.weight" => return layer.qk_norm.as_mut().map(|(_, k)| (k, false)),
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

/// The (parent, module, out, in) of each projection of one layer, in HF order.
fn projection_shapes(cfg: &ModelConfig) -> Vec<(&'static str, &'static str, usize, usize)> {
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (q_out, kv_out) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    linear_modules(cfg.arch)
        .iter()
        .map(|&(parent, module)| {
            let (out, inp) = match module {
                "q_proj" => (q_out, h),
                "k_proj" | "v_proj" => (kv_out, h),
                "qkv_proj" => (q_out + 2 * kv_out, h),
                "o_proj" => (h, q_out),
                "gate_up_proj" => (2 * inter, h),
                "down_proj" => (h, inter),
                _ => (inter, h), // gate_proj, up_proj
            };
            (parent, module, out, inp)
        })
        .collect()
}

/// Whether a projection carries a bias: Qwen2's q, k and v.
fn has_bias(cfg: &ModelConfig, module: &str) -> bool {
    cfg.qkv_bias && matches!(module, "q_proj" | "k_proj" | "v_proj")
}

/// Decoder layer `i` from the tensors `take` hands out by HF name and expected shape.
fn layer_from_tensors(
    cfg: &ModelConfig,
    i: usize,
    take: &mut impl FnMut(&str, &[usize]) -> Result<Weight>,
) -> Result<Block> {
    let (p, h, hd) = (format!("model.layers.{i}"), cfg.hidden_size, cfg.head_dim);
    let mut projections = Vec::new();
    for (parent, module, out, inp) in projection_shapes(cfg) {
        let name = format!("{p}.{parent}.{module}");
        let weight_t = take(&format!("{name}.weight"), &[out, inp])?;
        let bias = match has_bias(cfg, module) {
            true => Some(take(&format!("{name}.bias"), &[out])?),
            false => None,
        };
        projections.push(Projection {
            parent,
            module,
            linear: Linear::new(weight_t, bias),
        });
    }
    let qk_norm = match cfg.arch.has_qk_norm() {
        true => Some((
            take(&format!("{p}.self_attn.q_norm.weight"), &[hd])?,
            take(&format!("{p}.self_attn.k_norm.weight"), &[hd])?,
        )),
        false => None,
    };
    Ok(Block {
        input_norm: take(&format!("{p}.input_layernorm.weight"), &[h])?,
        post_norm: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
        qk_norm,
        projections,
    })
}

/// An error naming the tensors left after the model took its own (see `from_tensors`).
fn refuse_unused(tensors: HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<()> {
    let mut unused: Vec<String> = tensors
        .into_keys()
        .filter(|n| !n.ends_with(".rotary_emb.inv_freq"))
        .filter(|n| !(cfg.tie_embeddings && n == "lm_head.weight"))
        .collect();
    unused.sort();
    if let Some(first) = unused.first() {
        bail!(
            "the weights hold {} tensor(s) a {:?} model with this config does not use, e.g. {first:?}; \
             is config.json's model_type right?",
            unused.len(),
            cfg.arch
        );
    }
    Ok(())
}

/// HF parameter names and shapes of a model with this config.
pub fn parameter_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        if cfg.arch.has_qk_norm() {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![cfg.head_dim]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![cfg.head_dim]));
        }
        for (parent, module, o, i_) in projection_shapes(cfg) {
            out.push((format!("{p}.{parent}.{module}.weight"), vec![o, i_]));
            if has_bias(cfg, module) {
                out.push((format!("{p}.{parent}.{module}.bias"), vec![o]));
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
