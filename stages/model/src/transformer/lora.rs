//! LoRA (PEFT-compatible): which modules an adapter targets and how an adapted linear computes.
//!
//! Targets are written with the unfused names (`q_proj` ... `down_proj`) for every
//! architecture. On Phi-3's fused projections they map onto the fused module: any of
//! q/k/v_proj puts one adapter on `qkv_proj`, any of gate/up_proj one on `gate_up_proj`, as
//! PEFT does when it is given the fused names (one A shared by the fused outputs, one B with a
//! row per output), so the adapter saves under PEFT's names and loads in PEFT.
//!
//! An adapted linear computes `W x + scale * B (A dropout(x))` exactly as PEFT does (the base
//! output is not scaled, unlike candle-lora). B starts at zero so a fresh adapter leaves the model
//! unchanged; A is PEFT's kaiming-uniform (bound 1/sqrt(in)) drawn from a ChaCha stream keyed by
//! the seed and the parameter's name ([`crate::seed`]), so every matrix is reproducible on its own. Attaching and
//! merging adapters is in `finetune`; saving and loading them under PEFT's names in
//! `weights::adapter`.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::config::Arch;
use super::pass::Ctx;
use super::weight::Mode;

/// The module names LoRA may target, in HF/PEFT spelling, with their parent module.
pub const LINEAR_MODULES: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

/// Phi-3's projections (see [`crate::transformer::Arch::fused_projections`]), in HF order.
pub const FUSED_LINEAR_MODULES: [(&str, &str); 4] = [
    ("self_attn", "qkv_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_up_proj"),
    ("mlp", "down_proj"),
];

/// The projections of one decoder layer of `arch`, `(parent, module)` in HF order.
pub fn linear_modules(arch: Arch) -> &'static [(&'static str, &'static str)] {
    if arch.fused_projections() {
        &FUSED_LINEAR_MODULES
    } else {
        &LINEAR_MODULES
    }
}

/// The module names of `arch` that LoRA `targets` select, in the order first named. Unfused
/// architectures keep the list as written (so saved adapter configs keep their bytes); on
/// fused ones each target names the fused module holding it (see the module doc).
pub(crate) fn resolve_targets(arch: Arch, targets: &[String]) -> Result<Vec<String>> {
    let modules = linear_modules(arch);
    let mut out: Vec<String> = Vec::new();
    for t in targets {
        let module = match (arch.fused_projections(), t.as_str()) {
            (true, "q_proj" | "k_proj" | "v_proj") => "qkv_proj",
            (true, "gate_proj" | "up_proj") => "gate_up_proj",
            (_, other) => other,
        };
        if !modules.iter().any(|(_, m)| *m == module) {
            let known: Vec<&str> = modules.iter().map(|(_, m)| *m).collect();
            let mapped = if arch.fused_projections() {
                " (q/k/v_proj and gate/up_proj map onto the fused ones)"
            } else {
                ""
            };
            bail!(
                "unknown LoRA target module {t:?} for a {arch:?} model; known: {}{mapped}",
                known.join(", ")
            );
        }
        if !arch.fused_projections() || !out.iter().any(|m| m == module) {
            out.push(module.to_string());
        }
    }
    Ok(out)
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// rsLoRA: scale alpha/sqrt(r) instead of alpha/r.
    pub rslora: bool,
    pub dropout: f64,
    /// Module names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (on Phi-3 also
    /// qkv_proj and gate_up_proj; see the module doc).
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
            targets: LINEAR_MODULES
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

    pub(super) fn applies_to_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    pub(super) fn validate(&self, num_layers: usize) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA rank r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout {} must be in [0, 1)", self.dropout);
        }
        if self.targets.is_empty() {
            bail!("LoRA needs at least one target module");
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

/// A LoRA matrix's name in PEFT's saved adapters.
pub(crate) fn peft_name(layer: usize, parent: &str, module: &str, ab: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{parent}.{module}.lora_{ab}.weight")
}
