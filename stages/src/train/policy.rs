//! Loading the model a training kind trains: base weights, then a starting adapter, a fresh
//! LoRA, or full fine-tuning; and saving/restoring the trained weights.
//!
//! The reference policy for KL, LDIFS and on-policy sampling is the same base with the
//! adapter switched off ([`Transformer::set_lora_enabled`]): no second copy of the weights.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Var;
use emflow_engine::context::{Artifact, StageContext};
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

/// The model-layer device for the stage's device request.
pub fn device_setup(ctx: &StageContext) -> Result<emflow_model::DeviceSetup> {
    emflow_model::setup(ctx.device().cuda_ordinal())
}

/// Loads input `model`, then: the optional input `adapter` (training continues on it), or
/// full fine-tuning, or a fresh LoRA seeded by `seed`.
pub fn load_policy(
    ctx: &StageContext,
    lora: &LoraParams,
    full_finetune: bool,
    seed: u64,
) -> Result<Policy> {
    let setup = device_setup(ctx)?;
    let model = ctx.input("model")?;
    let mut lm = emflow_model::load(&model.path, &setup).with_context(|| {
        format!(
            "stage {}: loading model from {}",
            ctx.stage_id, model.origin
        )
    })?;
    lm.model.set_base_model_name(base_model_label(model));
    match ctx.optional_input("adapter")? {
        Some(adapter) => {
            if full_finetune {
                bail!(
                    "stage {}: `full_finetune: true` cannot continue the LoRA adapter wired to `adapter`; \
                     unwire it or set full_finetune to false",
                    ctx.stage_id
                );
            }
            lm.model.load_adapter(&adapter.path).with_context(|| {
                format!(
                    "stage {}: loading starting adapter {}",
                    ctx.stage_id, adapter.origin
                )
            })?;
        }
        None if full_finetune => lm.model.enable_full_finetune()?,
        None => lm.model.add_lora(&lora.to_config(), seed)?,
    }
    let vars = lm.model.trainable_vars();
    if vars.is_empty() {
        bail!(
            "stage {}: the model has no trainable weights after setup",
            ctx.stage_id
        );
    }
    Ok(Policy {
        lm,
        vars,
        full_finetune,
    })
}

/// What saved adapters record as `base_model_name_or_path`: the base's content digest, the
/// same one the stage key holds. The loader's default, the model's path, names the store the
/// stage happened to run against, so two stores (a local run and a Slurm run, two users)
/// committed different adapter bytes under one key. A context built by hand, with no
/// digest, falls back to the input's origin.
fn base_model_label(model: &Artifact) -> String {
    if model.digest.is_empty() {
        model.origin.clone()
    } else {
        format!("blake3:{}", model.digest)
    }
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

    /// Whether a reference (adapter off) exists.
    pub fn has_reference(&self) -> bool {
        !self.full_finetune
    }
}
