//! Preventive steering in the training kinds (`sft`, `rl`): the vector a `persona_vector`
//! stage wrote (input `steering`), times the stage's `steering_alpha`, added at the output of
//! the layer it was extracted at in every training forward pass of the policy
//! (`Transformer::set_steering`; see docs/persona-steering.md).
//!
//! Which passes that is, and which not: the policy's training passes (main, safety and, in
//! `rl`, the GRPO loss) are steered; the reference (adapter off: KL, LDIFS) is not
//! ([`super::policy::Policy::with_adapter_off`]); sampling (rollouts, evaluation) runs in eval
//! mode and is not. The vector is no trainable weight and is never saved: adapters and
//! checkpoints hold the LoRA weights only, so every evaluation sees the model without it.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use emflow_engine::context::StageContext;
use emflow_model::Steering;

use super::policy::Policy;

/// The vector's file in a `persona_vector` stage's `vector` folder.
pub const VECTOR_FILE: &str = "persona_vector.safetensors";
/// The vector's figures (layer, norm, counts) in the same folder.
pub const VECTOR_INFO: &str = "persona_vector.json";
/// The vector's tensor name inside [`VECTOR_FILE`].
pub const VECTOR_TENSOR: &str = "persona_vector";

/// Installs input `steering`'s vector times `alpha` on the policy, at the layer the vector
/// was extracted at (and says so in the stage's log); nothing when neither the input nor
/// `alpha` is set. One without the other is an error.
pub fn install(ctx: &StageContext, alpha: Option<f64>, policy: &mut Policy) -> Result<()> {
    let input = ctx.optional_input("steering")?;
    let (input, alpha) = match (input, alpha) {
        (None, None) => return Ok(()),
        (Some(input), Some(alpha)) => (input, alpha),
        (Some(input), None) => bail!(
            "stage {}: input `steering` ({}) is wired but `steering_alpha` is not set; set the coefficient (e.g. 5) or unwire it",
            ctx.stage_id,
            input.origin
        ),
        (None, Some(_)) => bail!(
            "stage {}: `steering_alpha` is set but input `steering` is not wired; wire a persona_vector stage's `vector`",
            ctx.stage_id
        ),
    };
    let steering = load(&input.path, alpha).with_context(|| {
        format!(
            "stage {}: reading the steering vector {}",
            ctx.stage_id, input.origin
        )
    })?;
    let layer = steering.layer();
    policy
        .lm
        .model
        .set_steering(Some(steering))
        .with_context(|| format!("stage {}: steering with {}", ctx.stage_id, input.origin))?;
    ctx.progress().log(&format!(
        "preventive steering: {alpha} x {} at the output of decoder layer {layer}, training passes only",
        input.origin
    ));
    Ok(())
}

/// The steering a `persona_vector` folder describes, scaled by `alpha`.
pub fn load(dir: &Path, alpha: f64) -> Result<Steering> {
    let info_path = dir.join(VECTOR_INFO);
    let info: serde_json::Value = std::fs::read(&info_path)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| Ok(serde_json::from_slice(&bytes)?))
        .with_context(|| format!("reading {}", info_path.display()))?;
    let layer = info["layer"].as_u64().with_context(|| {
        format!(
            "{} has no integer `layer`: wire a persona_vector stage's `vector`",
            info_path.display()
        )
    })?;
    let file = dir.join(VECTOR_FILE);
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .with_context(|| format!("reading {}", file.display()))?;
    let vector = tensors
        .remove(VECTOR_TENSOR)
        .with_context(|| format!("{} has no tensor `{VECTOR_TENSOR}`", file.display()))?;
    ensure!(
        alpha.is_finite(),
        "steering_alpha must be a finite number, got {alpha}"
    );
    Steering::new(layer as usize, &vector, alpha)
}
