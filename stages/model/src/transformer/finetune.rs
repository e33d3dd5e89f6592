//! Which weights a training run updates: LoRA adapters attached to (and merged into) the base
//! weights, or every base weight made trainable (full fine-tuning), and the trainable `Var`s
//! an optimiser steps.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

use rand_chacha::ChaCha8Rng;

use super::lora::{peft_name, resolve_targets, LoraAdapter, LoraConfig};
use super::model::Transformer;
use super::weight::Weight;
use crate::seed::{self, Purpose};

impl Transformer {
    /// Attach fresh adapters (B = 0, so outputs are unchanged until training). The targets
    /// are resolved onto this architecture's projections (see `lora`'s module doc); the
    /// attached config, and a saved adapter's, names those.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate(self.layers.len())?;
        let targets = resolve_targets(self.cfg.arch, &cfg.targets)?;
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
            for proj in layer.projections.iter_mut() {
                if !targets.iter().any(|t| t == proj.module) {
                    continue;
                }
                let lin = &mut proj.linear;
                let (inp, out) = lin.weight_t.detached().dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let param = peft_name(i, proj.parent, proj.module, "A");
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
        self.lora = Some(LoraConfig {
            targets,
            ..cfg.clone()
        });
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

    pub(crate) fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for p in &layer.projections {
                if let Some(lora) = &p.linear.lora {
                    out.push((peft_name(i, p.parent, p.module, "A"), lora.a.clone()));
                    out.push((peft_name(i, p.parent, p.module, "B"), lora.b.clone()));
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

    /// Fold every adapter into its base weight (W += scale * B A) and drop the adapters.
    pub fn merge_lora(&mut self) -> Result<()> {
        if self.lora.is_none() {
            bail!("this model has no LoRA adapter to merge");
        }
        for layer in self.layers.iter_mut() {
            for lin in layer.projections.iter_mut().map(|p| &mut p.linear) {
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
}
