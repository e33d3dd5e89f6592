//! LoRA adapters (PEFT-compatible) and full fine-tuning switches for [`Transformer`].
//!
//! An adapted linear computes `W x + scale * B (A dropout(x))` exactly as PEFT does (the base
//! output is not scaled, unlike candle-lora). B starts at zero so a fresh adapter leaves the model
//! unchanged; A is PEFT's kaiming-uniform (bound 1/sqrt(in)) drawn from a ChaCha stream keyed by
//! the seed and the parameter's name ([`crate::seed`]), so every matrix is reproducible on its own. Adapters are
//! saved under PEFT's names with an `adapter_config.json`, so `PeftModel.from_pretrained` loads
//! them on the HF copy of the base model.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::panel_matmul::PanelMatrix;
use crate::seed::{self, Purpose};
use crate::transformer::{Ctx, Mode, Transformer, Weight, LINEAR_MODULES};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const FULL_WEIGHTS: &str = "model.safetensors";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// rsLoRA: scale alpha/sqrt(r) instead of alpha/r.
    pub rslora: bool,
    pub dropout: f64,
    /// Module names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
    pub targets: Vec<String>,
    /// Layer indices to adapt; None = all.
    pub layers: Option<Vec<usize>>,
}

impl LoraConfig {
    /// LoRA on every linear projection (q, k, v, o, gate, up, down) of every layer, without
    /// dropout: the usual setting, and the paper's.
    pub fn all_linears(r: usize, alpha: f64, rslora: bool) -> Self {
        LoraConfig {
            r,
            alpha,
            rslora,
            dropout: 0.0,
            targets: crate::transformer::LINEAR_MODULES
                .iter()
                .map(|(_, name)| name.to_string())
                .collect(),
            layers: None,
        }
    }

    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    fn applies_to_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    fn validate(&self, num_layers: usize) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA rank r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout {} must be in [0, 1)", self.dropout);
        }
        if self.targets.is_empty() {
            bail!("LoRA needs at least one target module");
        }
        for t in &self.targets {
            if !LINEAR_MODULES.iter().any(|(_, m)| m == t) {
                let known: Vec<&str> = LINEAR_MODULES.iter().map(|(_, m)| *m).collect();
                bail!(
                    "unknown LoRA target module {t:?}; known: {}",
                    known.join(", ")
                );
            }
        }
        if let Some(layers) = &self.layers {
            if let Some(bad) = layers.iter().find(|l| **l >= num_layers) {
                bail!("LoRA layer {bad} does not exist: the model has {num_layers} layers");
            }
        }
        Ok(())
    }
}

/// One adapter pair on a linear layer: A (r, in), B (out, r), both f32 `Var`s.
pub(crate) struct LoraAdapter {
    pub(crate) a: Var,
    pub(crate) b: Var,
    pub(crate) scale: f64,
    pub(crate) dropout: f64,
}

impl LoraAdapter {
    /// `scale * B A dropout(x)` for `x` of shape (rows, in).
    pub(crate) fn forward(&self, x: &Tensor, cx: &Ctx) -> Result<Tensor> {
        let (a, b) = match cx.mode {
            Mode::Train => (self.a.as_tensor().clone(), self.b.as_tensor().clone()),
            Mode::Eval => (self.a.as_detached_tensor(), self.b.as_detached_tensor()),
        };
        let (a, b) = (a.to_dtype(cx.dtype)?, b.to_dtype(cx.dtype)?);
        let x = match (cx.mode, cx.dropout) {
            (Mode::Train, Some(rng)) if self.dropout > 0.0 => {
                let keep = 1.0 - self.dropout;
                let n = x.elem_count();
                let mask: Vec<f32> = {
                    let mut rng = rng
                        .lock()
                        .map_err(|_| anyhow::anyhow!("LoRA dropout RNG lock poisoned"))?;
                    (0..n)
                        .map(|_| {
                            if rng.random::<f64>() < keep {
                                (1.0 / keep) as f32
                            } else {
                                0.0
                            }
                        })
                        .collect()
                };
                let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
                (x * mask)?
            }
            _ => x.clone(),
        };
        Ok((x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?)
    }
}

fn peft_name(layer: usize, parent: &str, module: &str, ab: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{parent}.{module}.lora_{ab}.weight")
}

/// PEFT's adapter_config.json fields we read (others are ignored).
#[derive(Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    layers_to_transform: serde_json::Value,
}

impl Transformer {
    /// Attach fresh adapters (B = 0, so outputs are unchanged until training).
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate(self.layers.len())?;
        if self.lora.is_some() {
            bail!("this model already has a LoRA adapter; merge it first to stack another");
        }
        if self.has_trainable_base() {
            bail!("full fine-tuning is enabled on this model; LoRA and full fine-tuning cannot be combined");
        }
        let scale = cfg.scale();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if !cfg.applies_to_layer(i) {
                continue;
            }
            for (parent, module) in LINEAR_MODULES {
                if !cfg.targets.iter().any(|t| t == module) {
                    continue;
                }
                let lin = layer
                    .linear_mut(module)
                    .context("internal: LINEAR_MODULES out of sync with Block")?;
                let (inp, out) = lin.weight_t.detached().dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let param = peft_name(i, parent, module, "A");
                let mut rng: ChaCha8Rng = seed::stream(Purpose::LoraInit {
                    seed,
                    param: &param,
                });
                let a: Vec<f32> = (0..cfg.r * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (cfg.r, inp), &Device::Cpu)?.to_device(&self.device)?;
                lin.lora = Some(LoraAdapter {
                    a: Var::from_tensor(&a)?,
                    b: Var::zeros((out, cfg.r), DType::F32, &self.device)?,
                    scale,
                    dropout: cfg.dropout,
                });
            }
        }
        self.lora = Some(cfg.clone());
        self.lora_enabled = true;
        *self
            .dropout_rng
            .get_mut()
            .map_err(|_| anyhow::anyhow!("LoRA dropout RNG lock poisoned"))? =
            seed::stream(Purpose::LoraDropout { seed });
        Ok(())
    }

    /// The attached LoRA configuration, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// With `false`, forward passes ignore the adapter (the reference policy) without removing it.
    pub fn set_lora_enabled(&mut self, on: bool) {
        self.lora_enabled = on;
    }

    fn has_trainable_base(&mut self) -> bool {
        self.all_weights_mut()
            .iter()
            .any(|w| matches!(w, Weight::Trainable(_)))
    }

    /// Make every base weight a trainable f32 `Var` (full fine-tuning).
    pub fn enable_full_finetune(&mut self) -> Result<()> {
        if self.lora.is_some() {
            bail!("this model has a LoRA adapter; merge it (merge_lora) before full fine-tuning");
        }
        for w in self.all_weights_mut() {
            w.make_trainable()?;
        }
        self.refresh_embed_t()?;
        Ok(())
    }

    fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (parent, module) in LINEAR_MODULES {
                if let Some(lora) = layer.linear(module).and_then(|l| l.lora.as_ref()) {
                    out.push((peft_name(i, parent, module, "A"), lora.a.clone()));
                    out.push((peft_name(i, parent, module, "B"), lora.b.clone()));
                }
            }
        }
        out
    }

    /// Trainable vars sorted by name: LoRA A/B under PEFT names, or every weight under HF names
    /// with full fine-tuning.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = self.lora_vars();
        for (name, w, _) in self.named_weight_refs() {
            if let Weight::Trainable(v) = w {
                out.push((name, v.clone()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Write `adapter_model.safetensors` (PEFT names, f32) and `adapter_config.json`.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let cfg = self
            .lora
            .as_ref()
            .context("this model has no LoRA adapter to save")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors: HashMap<String, Tensor> = self
            .lora_vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_detached_tensor().to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let path = dir.join(ADAPTER_WEIGHTS);
        candle_core::safetensors::save(&tensors, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name,
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "use_rslora": cfg.rslora,
            "lora_dropout": cfg.dropout,
            "target_modules": cfg.targets,
            "layers_to_transform": cfg.layers,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
        });
        let path = dir.join(ADAPTER_CONFIG);
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Load a PEFT LoRA adapter folder; attaches the adapter first if the model has none.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let cfg = read_adapter_config(dir)?;
        match &self.lora {
            None => self.add_lora(&cfg, 0)?,
            Some(existing) => {
                if existing.r != cfg.r
                    || existing.targets != cfg.targets
                    || existing.layers != cfg.layers
                {
                    bail!(
                        "the adapter in {} (r={}, targets {:?}, layers {:?}) does not match the one attached (r={}, targets {:?}, layers {:?})",
                        dir.display(), cfg.r, cfg.targets, cfg.layers, existing.r, existing.targets, existing.layers
                    );
                }
                // Scaling and dropout follow the file.
                self.lora = Some(cfg.clone());
                for layer in self.layers.iter_mut() {
                    for (_, module) in LINEAR_MODULES {
                        if let Some(l) = layer.linear_mut(module).and_then(|l| l.lora.as_mut()) {
                            l.scale = cfg.scale();
                            l.dropout = cfg.dropout;
                        }
                    }
                }
            }
        }
        let path = dir.join(ADAPTER_WEIGHTS);
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("reading adapter weights {}", path.display()))?;
        for (name, var) in self.lora_vars() {
            let t = tensors
                .remove(&name)
                .or_else(|| tensors.remove(&name.replace(".weight", ".default.weight")))
                .with_context(|| format!("{} lacks the adapter tensor {name}", path.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "adapter tensor {name} in {} has shape {:?}, expected {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        if let Some(extra) = tensors.keys().next() {
            bail!(
                "{} holds tensors this adapter config does not describe (e.g. {extra}); only LoRA A/B on the listed targets are supported",
                path.display()
            );
        }
        self.lora_enabled = true;
        Ok(())
    }

    /// Fold every adapter into its base weight (W += scale * B A) and drop the adapters.
    pub fn merge_lora(&mut self) -> Result<()> {
        if self.lora.is_none() {
            bail!("this model has no LoRA adapter to merge");
        }
        for layer in self.layers.iter_mut() {
            for (_, module) in LINEAR_MODULES {
                let lin = layer
                    .linear_mut(module)
                    .context("internal: LINEAR_MODULES out of sync with Block")?;
                if let Some(lora) = lin.lora.take() {
                    // Held transposed: Wᵀ += scale (B A)ᵀ = scale Aᵀ Bᵀ.
                    let a_t = lora.a.as_detached_tensor().t()?;
                    let b_t = lora.b.as_detached_tensor().t()?;
                    let delta_t = (a_t.matmul(&b_t)? * lora.scale)?;
                    let merged = (lin.weight_t.detached().to_dtype(DType::F32)? + delta_t)?;
                    lin.weight_t.set(&merged)?;
                }
            }
        }
        self.lora = None;
        Ok(())
    }

    /// Write every weight (f32, HF names) as `model.safetensors` plus an HF `config.json`.
    pub fn save_full(&self, dir: &Path) -> Result<()> {
        if self.lora.is_some() {
            bail!("this model has a LoRA adapter: save it with save_adapter, or merge_lora first");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors: HashMap<String, Tensor> = self
            .named_weights()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let path = dir.join(FULL_WEIGHTS);
        candle_core::safetensors::save(&tensors, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&self.cfg.to_hf_json())?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Overwrite every weight from a folder written by [`Self::save_full`] (same architecture).
    pub fn load_full(&mut self, dir: &Path) -> Result<()> {
        let files = crate::weights::hf::safetensors_files(dir)?;
        let tensors = crate::weights::hf::read_tensors(
            &files,
            &crate::device::DeviceSetup {
                device: self.device.clone(),
                compute_dtype: DType::F32,
            },
        )?;
        let mut missing: BTreeSet<String> = self
            .named_weight_refs()
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        for (name, t) in tensors {
            if self.cfg.tie_embeddings && name == "lm_head.weight" {
                continue;
            }
            let (w, transposed) = self.weight_mut(&name).with_context(|| {
                format!(
                    "{} holds {name}, which this model does not have",
                    dir.display()
                )
            })?;
            let t = if transposed { t.t()?.contiguous()? } else { t };
            w.set(&t)
                .with_context(|| format!("loading {name} from {}", dir.display()))?;
            missing.remove(&name);
        }
        self.refresh_embed_t()?;
        if let Some(name) = missing.iter().next() {
            bail!(
                "{} lacks {} weight(s), e.g. {name}",
                dir.display(),
                missing.len()
            );
        }
        Ok(())
    }
}

fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (a PEFT adapter folder needs it)",
            path.display()
        )
    })?;
    let peft: PeftConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if let Some(kind) = &peft.peft_type {
        if kind != "LORA" {
            bail!(
                "{}: peft_type {kind:?} is not supported (only LORA)",
                path.display()
            );
        }
    }
    let targets = match &peft.target_modules {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("{}: target_modules must be strings", path.display()))?,
        serde_json::Value::String(s) => bail!(
            "{}: target_modules as a regex ({s:?}) is not supported; list the module names",
            path.display()
        ),
        _ => bail!("{}: target_modules is missing", path.display()),
    };
    let layers = match &peft.layers_to_transform {
        serde_json::Value::Null => None,
        serde_json::Value::Number(n) => Some(vec![n
            .as_u64()
            .with_context(|| format!("{}: bad layers_to_transform", path.display()))?
            as usize]),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{}: bad layers_to_transform", path.display()))?,
        ),
        _ => bail!("{}: bad layers_to_transform", path.display()),
    };
    Ok(LoraConfig {
        r: peft.r,
        alpha: peft.lora_alpha,
        rslora: peft.use_rslora,
        dropout: peft.lora_dropout,
        targets,
        layers,
    })
}

/// Adds an adapter's share, `scale · (x Aᵀ) Bᵀ`, to `y` (rows, n) on the host: `x` is
/// (rows, k), `a` (r, k) and `b` (n, r), all row-major. Both factors go through the panel
/// kernel (packing them costs less than one pass over `x`), so each row is computed on its
/// own, vectorised. (Plain iterator sums here were a strict f32 chain the compiler may not
/// vectorise: they took 70 % of a GRPO rollout's main-thread time.)
pub(crate) fn add_adapter(
    y: &mut [f32],
    x: &[f32],
    (a, b): (&[f32], &[f32]),
    (rows, k, n): (usize, usize, usize),
    scale: f32,
) {
    let r = a.len() / k.max(1);
    let down = PanelMatrix::from_out_in(a, r, k).matmul(x, rows);
    let up = PanelMatrix::from_out_in(b, n, r).matmul(&down, rows);
    for (yv, u) in y.iter_mut().zip(&up) {
        *yv += scale * u;
    }
}
