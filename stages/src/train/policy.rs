//! The model a training kind trains ([`Policy`]), its LoRA settings, and saving/restoring
//! the trained weights. Loading it is [`super::setup::load_policy`]'s job.
//!
//! The reference policy for KL, LDIFS and on-policy sampling is the same base with the
//! adapter switched off ([`Policy::with_adapter_off`]): no second copy of the weights.

use std::path::Path;

use anyhow::Result;
use candle_core::Var;
use emflow_model::{LoadedModel, LoraConfig};
use serde::{Deserialize, Serialize};

/// LoRA settings as a manifest writes them (the paper's warm-up defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LoraParams {
    /// Rank of the low-rank update.
    pub r: usize,
    /// Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).
    pub alpha: f64,
    /// Rank-stabilised scaling (alpha / sqrt(r)).
    pub rslora: bool,
    /// Dropout on the adapter's input.
    pub dropout: f64,
    /// Projection names that get an adapter.
    pub targets: Vec<String>,
    /// Decoder layers that get adapters (0-based); null = all.
    pub layers: Option<Vec<usize>>,
}

impl Default for LoraParams {
    fn default() -> Self {
        LoraParams {
            r: 32,
            alpha: 64.0,
            rslora: true,
            dropout: 0.0,
            targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            layers: None,
        }
    }
}

impl LoraParams {
    pub fn to_config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            rslora: self.rslora,
            dropout: self.dropout,
            targets: self.targets.clone(),
            layers: self.layers.clone(),
        }
    }
}

/// The model being trained and its trainable variables (sorted by name).
pub struct Policy {
    pub lm: LoadedModel,
    pub vars: Vec<(String, Var)>,
    pub full_finetune: bool,
}

impl Policy {
    /// Writes the trained weights: a PEFT adapter folder, or full weights.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.full_finetune {
            self.lm.model.save_full(dir)
        } else {
            self.lm.model.save_adapter(dir)
        }
    }

    /// Restores weights written by [`Self::save`] into the same vars (for resuming).
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        if self.full_finetune {
            self.lm.model.load_full(dir)?;
        } else {
            self.lm.model.load_adapter(dir)?;
        }
        // Loading may rebuild the vars; the optimizer must see the live ones.
        self.vars = self.lm.model.trainable_vars();
        Ok(())
    }

    /// Runs `f` on the reference policy, this model with the adapter switched off (and its
    /// preventive steering, if any: the reference is the base as it was), and switches both
    /// back on before returning `f`'s result (an error included).
    pub fn with_adapter_off<T>(&mut self, f: impl FnOnce(&Policy) -> T) -> T {
        self.lm.model.set_lora_enabled(false);
        self.lm.model.set_steering_enabled(false);
        let out = f(self);
        self.lm.model.set_lora_enabled(true);
        self.lm.model.set_steering_enabled(true);
        out
    }

    /// Whether a reference (adapter off) exists.
    pub fn has_reference(&self) -> bool {
        !self.full_finetune
    }
}
