//! PEFT LoRA adapter folders: `adapter_model.safetensors` (A/B under PEFT's names, f32) and
//! `adapter_config.json`, written so `PeftModel.from_pretrained` loads them on the HF copy of
//! the base model, and read back onto a [`Transformer`].

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::json;

use crate::transformer::lora::resolve_targets;
use crate::transformer::{LoraConfig, Transformer};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

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
    /// Targets compare as sets of this architecture's projections, so an adapter saved by
    /// PEFT (which sorts them) loads onto one attached by emflow.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let cfg = read_adapter_config(dir)?;
        match &self.lora {
            None => self.add_lora(&cfg, 0)?,
            Some(existing) => {
                let targets = |c: &LoraConfig| -> Result<BTreeSet<String>> {
                    Ok(resolve_targets(self.cfg.arch, &c.targets)?
                        .into_iter()
                        .collect())
                };
                if existing.r != cfg.r
                    || targets(existing)? != targets(&cfg)?
                    || existing.layers != cfg.layers
                {
                    bail!(
                        "the adapter in {} (r={}, targets {:?}, layers {:?}) does not match the one attached (r={}, targets {:?}, layers {:?})",
                        dir.display(), cfg.r, cfg.targets, cfg.layers, existing.r, existing.targets, existing.layers
                    );
                }
                // Scaling and dropout follow the file; the targets stay as attached.
                self.lora = Some(LoraConfig {
                    targets: existing.targets.clone(),
                    ..cfg.clone()
                });
                for layer in self.layers.iter_mut() {
                    for p in layer.projections.iter_mut() {
                        if let Some(l) = p.linear.lora.as_mut() {
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
