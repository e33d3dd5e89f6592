//! Loading the models a stage runs, in one place for every kind and the local judge:
//! - [`load_policy`]: the model a training kind trains: base weights, then a starting
//!   adapter, a fresh LoRA, or full fine-tuning; and [`optimizer`] over its weights;
//! - [`load_model`] / [`load_stage_model`]: a frozen model to sample from or to judge with,
//!   base weights plus an optional PEFT adapter or full fine-tuned weights.
//!
//! The reference policy for KL, LDIFS and on-policy sampling is no second load: it is the
//! same base with the adapter switched off ([`Policy::with_adapter_off`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use emflow_engine::context::{Artifact, StageContext};
use emflow_model::{AdamW, AdamWConfig, LoadedModel};

use super::policy::{LoraParams, Policy};

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

/// AdamW over the policy's trainable weights, decaying the weights transformers decays. The
/// learning rate is the schedule's, given to each step.
pub fn optimizer(policy: &Policy, weight_decay: f64) -> Result<AdamW> {
    let config = AdamWConfig::with_weight_decay(weight_decay);
    let mut opt = AdamW::new(policy.vars.clone(), config)?;
    opt.set_weight_decay_filter(emflow_model::optim::transformers_decays);
    Ok(opt)
}

/// Loads a model and, when given, an adapter: a PEFT folder (`adapter_config.json`) or a
/// folder of full fine-tuned weights.
pub fn load_model(
    model: &Path,
    adapter: Option<&Path>,
    setup: &emflow_model::DeviceSetup,
) -> Result<LoadedModel> {
    let mut lm = emflow_model::load(model, setup)
        .with_context(|| format!("loading model {}", model.display()))?;
    if let Some(dir) = adapter {
        if dir.join("adapter_config.json").is_file() {
            lm.model
                .load_adapter(dir)
                .with_context(|| format!("loading adapter {}", dir.display()))?;
        } else {
            lm.model
                .load_full(dir)
                .with_context(|| format!("loading fine-tuned weights {}", dir.display()))?;
        }
    }
    Ok(lm)
}

/// The stage's input `model` with its optional input `adapter`, frozen, on the stage's
/// device: the model `eval` and `safety_data` sample from.
pub fn load_stage_model(ctx: &StageContext) -> Result<LoadedModel> {
    let model = ctx.input("model")?;
    let adapter = ctx.optional_input("adapter")?;
    load_model(
        &model.path,
        adapter.map(|a| a.path.as_path()),
        &device_setup(ctx)?,
    )
}
