//! Token log-probabilities and masked reductions: the building blocks of the SFT loss and
//! of GRPO's policy and KL terms.
//!
//! Everything here is differentiable, so gradients reach the model's vars. `token_logprobs`
//! computes `z[target] - logsumexp(z)` instead of a full `log_softmax`: on the CPU as one op
//! with its own backward (see `fused_logprobs`), elsewhere from candle ops (no fused softmax
//! kernel, whose backward candle lacks).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};

use crate::ops::train::TargetLogprobs;

/// Log-probabilities of `targets` (b, t; u32) under `logits` (b, t, vocab) divided by
/// `temperature`; returns (b, t) in the logits' dtype. Differentiable with respect to `logits`.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("temperature must be a positive number, got {temperature}");
    }
    let (b, t, _) = logits
        .dims3()
        .context("token_logprobs: logits must be (batch, time, vocab)")?;
    if targets.dims() != [b, t] {
        bail!(
            "token_logprobs: targets have shape {:?}, logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let op = TargetLogprobs {
            targets: targets
                .to_dtype(DType::U32)?
                .flatten_all()?
                .to_vec1::<u32>()?,
            temperature: temperature as f32,
        };
        // Applied to the (b, t, vocab) logits as they are: a reshape would be one more graph
        // node, and candle's backward zero-fills and sums a logits-sized tensor for it.
        return Ok(logits.contiguous()?.apply_op1(op)?);
    }
    // gather needs a contiguous source; a division already produces one.
    let z = if temperature == 1.0 {
        logits.contiguous()?
    } else {
        (logits / temperature)?
    };
    // The shift only keeps exp() in range; logsumexp does not depend on it, so no gradient.
    let shift = z.max_keepdim(D::Minus1)?.detach();
    let lse = ((z
        .broadcast_sub(&shift)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log())?
        + shift)?;
    let picked = z.gather(
        &targets
            .to_dtype(DType::U32)?
            .unsqueeze(D::Minus1)?
            .contiguous()?,
        D::Minus1,
    )?;
    Ok((picked - lse)?.squeeze(D::Minus1)?)
}

/// Sum of `values` where `mask` is non-zero (same shape; any dtype), as a scalar.
pub fn masked_sum(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_same_shape(values, mask)?;
    Ok((values * mask.to_dtype(values.dtype())?)?.sum_all()?)
}

/// Mean of `values` over the positions where `mask` is non-zero, pooled over the whole batch
/// (TRL's SFT loss: every target token weighs the same). An empty mask gives 0.
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(values.dtype())?;
    let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((masked_sum(values, &mask)? / count.max(1.0))?)
}

/// Mean over rows of each row's masked mean (GRPO's original sequence-level averaging);
/// `values` and `mask` are (b, t). A row with an empty mask contributes 0.
pub fn masked_mean_per_row(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_same_shape(values, mask)?;
    let (b, _) = values
        .dims2()
        .context("masked_mean_per_row: values must be (batch, time)")?;
    let mask = mask.to_dtype(values.dtype())?;
    let row_sums = (values * &mask)?.sum(D::Minus1)?;
    let row_counts = mask.sum(D::Minus1)?.clamp(1.0, f64::INFINITY)?;
    Ok(((row_sums / row_counts)?.sum_all()? / b.max(1) as f64)?)
}

/// Supervised fine-tuning loss: mean next-token cross-entropy over the tokens `mask` marks
/// (b, t; e.g. the assistant mask of [`crate::text::EncodedChat`]). The logits at position i
/// predict token i+1, so the mask is read at the predicted positions.
pub fn sft_loss(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, _) = logits
        .dims3()
        .context("sft_loss: logits must be (batch, time, vocab)")?;
    if ids.dims() != [b, t] || mask.dims() != [b, t] {
        bail!(
            "sft_loss: logits {:?}, ids {:?} and mask {:?} disagree on (batch, time)",
            logits.dims(),
            ids.dims(),
            mask.dims()
        );
    }
    if t < 2 {
        bail!("sft_loss needs sequences of at least 2 tokens, got {t}");
    }
    // Shift targets and mask left instead of narrowing the logits: the logits are the big
    // tensor, and a narrowed view would have to be copied for gather. The last position
    // predicts nothing (target 0, mask 0).
    let pad_ids = Tensor::zeros((b, 1), ids.dtype(), ids.device())?;
    let targets = Tensor::cat(&[&ids.narrow(1, 1, t - 1)?, &pad_ids], 1)?;
    let pad_mask = Tensor::zeros((b, 1), mask.dtype(), mask.device())?;
    let mask = Tensor::cat(&[&mask.narrow(1, 1, t - 1)?, &pad_mask], 1)?;
    let logprobs = token_logprobs(logits, &targets, 1.0)?;
    masked_mean(&logprobs.neg()?, &mask)
}

fn check_same_shape(values: &Tensor, mask: &Tensor) -> Result<()> {
    if values.dims() != mask.dims() {
        bail!(
            "values have shape {:?} but the mask has {:?}",
            values.dims(),
            mask.dims()
        );
    }
    Ok(())
}
