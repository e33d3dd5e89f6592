//! The GRPO objective on plain tensors: advantages, importance ratios, clipping, the k3 KL
//! and the four loss aggregations of TRL's `GRPOTrainer`.
//!
//! Kept free of any model so every formula can be checked against hand-computed values on
//! tiny tensors, and so that a number logged by emflow means what it means in TRL:
//! - advantages: `r - mean_group`, divided by `std + 1e-4` where std is the *unbiased* std of
//!   the group (`group`) or of the whole batch (`batch`); `none` leaves them centred only;
//! - ratio: `exp(logp - old_logp)` per token (`token`), or `exp` of the masked mean of the
//!   token log-ratios of each sequence broadcast over its tokens (`sequence`, GSPO style);
//! - per-token loss `-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
//!   + beta * k3` with `k3 = exp(ref - pol) - (ref - pol) - 1`;
//! - aggregation (`loss_type`), with `m` the completion mask of one micro-batch:
//!   `grpo` = mean over sequences of (sum over tokens / tokens of the sequence),
//!   `bnpo` = sum / tokens of the micro-batch, `dr_grpo` = sum / (rows x max completion
//!   length), each then divided by the gradient-accumulation steps; `dapo` = sum / tokens of
//!   the whole accumulated batch. So only `bnpo` depends on how a step is split into
//!   micro-batches, exactly as in TRL, which is why the split is a semantic parameter.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::regularise::k3_kl;

/// How per-token losses are reduced to one number (TRL's `loss_type`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    // TRL's default (a doc comment here would reorder the options schemars lists).
    #[default]
    Grpo,
    Bnpo,
    DrGrpo,
    Dapo,
}

/// Granularity of the importance ratio (TRL's `importance_sampling_level`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSampling {
    Token,
    // TRL's default (a doc comment here would reorder the options schemars lists).
    #[default]
    Sequence,
}

/// Which standard deviation scales the centred rewards (TRL's `scale_rewards`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageScaling {
    // TRL's default (a doc comment here would reorder the options schemars lists).
    #[default]
    Group,
    Batch,
    None,
}

/// Added to the std before dividing, as in TRL.
pub const ADVANTAGE_STD_EPS: f64 = 1e-4;

/// Advantages of one step's rewards, laid out group after group (`group_size` completions
/// of the first prompt, then of the second, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Advantages {
    pub values: Vec<f64>,
    /// Unbiased std of each group's rewards (logged as `reward_std` even when unscaled).
    pub group_std: Vec<f64>,
    /// Share of groups whose rewards are all equal: they carry no learning signal.
    pub frac_zero_std: f64,
}

fn unbiased_std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return f64::NAN;
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (xs.len() - 1) as f64;
    var.sqrt()
}

/// Group-relative advantages. Errors when the rewards do not split into whole groups.
pub fn compute_advantages(
    rewards: &[f64],
    group_size: usize,
    scaling: AdvantageScaling,
) -> Result<Advantages> {
    ensure!(group_size >= 1, "group size must be at least 1");
    ensure!(
        rewards.len().is_multiple_of(group_size),
        "{} rewards do not split into groups of {group_size}",
        rewards.len()
    );
    ensure!(
        rewards.iter().all(|r| r.is_finite()),
        "a reward is not a finite number: {rewards:?}"
    );
    let batch_std = unbiased_std(rewards);
    let mut values = Vec::with_capacity(rewards.len());
    let mut group_std = Vec::new();
    let mut zero_std = 0usize;
    for group in rewards.chunks(group_size) {
        let mean = group.iter().sum::<f64>() / group.len() as f64;
        let std = unbiased_std(group);
        // A single-completion group has no spread: treat it as zero, like an all-equal group.
        let std_or_zero = if std.is_nan() { 0.0 } else { std };
        if std_or_zero.abs() < 1e-8 {
            zero_std += 1;
        }
        group_std.push(std_or_zero);
        let scale = match scaling {
            AdvantageScaling::Group => std_or_zero + ADVANTAGE_STD_EPS,
            AdvantageScaling::Batch => {
                (if batch_std.is_nan() { 0.0 } else { batch_std }) + ADVANTAGE_STD_EPS
            }
            AdvantageScaling::None => 1.0,
        };
        values.extend(group.iter().map(|r| (r - mean) / scale));
    }
    let groups = group_std.len().max(1);
    Ok(Advantages {
        values,
        group_std,
        frac_zero_std: zero_std as f64 / groups as f64,
    })
}

/// Loss settings of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoLossConfig {
    pub loss_type: LossType,
    pub importance_sampling: ImportanceSampling,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Weight of the k3 KL term; 0 switches it (and the reference logps) off.
    pub beta: f64,
    /// `max_completion_length`, the `dr_grpo` denominator.
    pub max_completion_length: usize,
}

/// One micro-batch: rows are completions, columns completion positions (right-padded).
pub struct MicroBatch<'a> {
    /// (b, t) log-probs of the completion tokens under the policy being trained (with graph).
    pub policy_logps: &'a Tensor,
    /// (b, t) log-probs under the policy that sampled (before this step's updates). `None`
    /// means "the policy itself, detached": ratio 1, TRL's shortcut for `num_iterations = 1`.
    pub old_logps: Option<&'a Tensor>,
    /// (b, t) log-probs under the frozen reference; required when `beta > 0`. Given at
    /// `beta = 0`, they only feed the logged KL.
    pub ref_logps: Option<&'a Tensor>,
    /// (b, t) f32, 1 on completion tokens, 0 on padding.
    pub mask: &'a Tensor,
    /// (b,) f32 advantages.
    pub advantages: &'a Tensor,
}

/// How the micro-batch sits in its optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepShape {
    /// Micro-batches per optimizer step.
    pub grad_accum_steps: usize,
    /// Completion tokens in the whole optimizer step (the `dapo` denominator).
    pub step_tokens: f64,
}

/// Figures of one micro-batch, as TRL logs them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    /// Masked mean k3 KL; `None` when no reference log-probs were given (beta 0 without
    /// `log_kl`).
    pub kl: Option<f64>,
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
}

pub struct GrpoLoss {
    /// Scalar, ready for `backward()` (already divided for gradient accumulation).
    pub loss: Tensor,
    pub stats: LossStats,
}

/// The GRPO loss of one micro-batch: the clipped surrogate per token ([`surrogate`]), plus
/// the k3 term, aggregated as `loss_type` says ([`aggregate`]); clip shares for the log.
pub fn grpo_loss(cfg: &GrpoLossConfig, mb: &MicroBatch, shape: StepShape) -> Result<GrpoLoss> {
    let (rows, cols) = mb
        .policy_logps
        .dims2()
        .context("policy logps must be (batch, tokens)")?;
    ensure!(
        mb.mask.dims() == [rows, cols],
        "mask {:?} does not match logps ({rows}, {cols})",
        mb.mask.dims()
    );
    ensure!(
        mb.advantages.dims() == [rows],
        "advantages {:?} do not match {rows} rows",
        mb.advantages.dims()
    );
    ensure!(
        shape.grad_accum_steps >= 1,
        "gradient accumulation steps must be at least 1"
    );
    let mask = mb.mask.to_dtype(DType::F32)?;
    let pol = mb.policy_logps;
    let token_counts = mask.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?; // (b,1)
    let total_tokens = mask.sum_all()?.to_scalar::<f32>()? as f64;
    let masked_mean = |x: &Tensor| -> Result<f64> {
        let x = x.detach().to_dtype(DType::F32)?;
        if x.dim(1)? == 1 {
            Ok(x.mean_all()?.to_scalar::<f32>()? as f64)
        } else {
            Ok((x * &mask)?.sum_all()?.to_scalar::<f32>()? as f64 / total_tokens.max(1.0))
        }
    };
    let (mut per_token, coef1, adv) = surrogate(cfg, mb, &mask, &token_counts)?;

    let mut kl_stat = None;
    if cfg.beta != 0.0 {
        let Some(reference) = mb.ref_logps else {
            bail!(
                "beta = {} needs reference log-probs, but none were computed",
                cfg.beta
            )
        };
        let kl = k3_kl(reference, pol)?;
        kl_stat = Some(masked_mean(&kl)?);
        per_token = (per_token + (kl * cfg.beta)?)?;
    } else if let Some(reference) = mb.ref_logps {
        // Logged only (`log_kl` at beta = 0): the loss is not touched, so its bits are the
        // same as a run that never computed the reference.
        kl_stat = Some(masked_mean(&k3_kl(reference, &pol.detach())?)?);
    }

    let masked_sum_rows = (&per_token * &mask)?.sum_keepdim(D::Minus1)?; // (b,1)
    let loss = aggregate(
        cfg,
        shape,
        &masked_sum_rows,
        &token_counts,
        total_tokens,
        rows,
    )?;
    let clip = clip_shares(cfg, &coef1.detach(), &adv)?;
    let stats = LossStats {
        kl: kl_stat,
        clip_low: masked_mean(&clip[0])?,
        clip_high: masked_mean(&clip[1])?,
        clip_region: masked_mean(&clip[2])?,
    };
    Ok(GrpoLoss { loss, stats })
}

/// The clipped surrogate per token, `-min(ratio * A, clip(ratio) * A)` broadcast to (b, t),
/// with the importance weights `ratio` and the advantages as (b, 1) for the clip shares.
fn surrogate(
    cfg: &GrpoLossConfig,
    mb: &MicroBatch,
    mask: &Tensor,
    token_counts: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let pol = mb.policy_logps;
    let old = match mb.old_logps {
        Some(o) => o.clone(),
        None => pol.detach(),
    };
    let log_ratio = (pol - &old)?;
    let log_weights = match cfg.importance_sampling {
        ImportanceSampling::Token => log_ratio,
        ImportanceSampling::Sequence => (log_ratio * mask)?
            .sum_keepdim(D::Minus1)?
            .div(token_counts)?, // (b,1)
    };
    let coef1 = log_weights.exp()?;
    let coef2 = coef1.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?;
    let adv = mb.advantages.to_dtype(DType::F32)?.unsqueeze(1)?; // (b,1)
    let loss1 = coef1.broadcast_mul(&adv)?;
    let loss2 = coef2.broadcast_mul(&adv)?;
    let per_token = loss1
        .minimum(&loss2)?
        .neg()?
        .broadcast_as(pol.dims2()?)?
        .contiguous()?;
    Ok((per_token, coef1, adv))
}

/// Reduces the rows' masked loss sums (b, 1) to the micro-batch's loss, per `loss_type`.
fn aggregate(
    cfg: &GrpoLossConfig,
    shape: StepShape,
    masked_sum_rows: &Tensor,
    token_counts: &Tensor,
    total_tokens: f64,
    rows: usize,
) -> Result<Tensor> {
    let ga = shape.grad_accum_steps as f64;
    Ok(match cfg.loss_type {
        LossType::Grpo => (masked_sum_rows.div(token_counts)?.mean_all()? / ga)?,
        LossType::Bnpo => (masked_sum_rows.sum_all()? / (total_tokens.max(1.0) * ga))?,
        LossType::DrGrpo => {
            ensure!(
                cfg.max_completion_length >= 1,
                "dr_grpo needs max_completion_length >= 1"
            );
            (masked_sum_rows.sum_all()? / (rows as f64 * cfg.max_completion_length as f64 * ga))?
        }
        LossType::Dapo => {
            ensure!(
                shape.step_tokens > 0.0,
                "dapo needs the token count of the whole step"
            );
            (masked_sum_rows.sum_all()? / shape.step_tokens)?
        }
    })
}

/// Where the ratio was clipped, as TRL counts it: `[low, high, region]`, each 1 where the ratio
/// (detached) fell below `1 - eps_low` with a negative advantage, above `1 + eps_high`
/// with a positive one, or either.
fn clip_shares(cfg: &GrpoLossConfig, coef1: &Tensor, adv: &Tensor) -> Result<[Tensor; 3]> {
    let adv_neg = adv.lt(0.0)?.to_dtype(DType::F32)?;
    let adv_pos = adv.gt(0.0)?.to_dtype(DType::F32)?;
    let low = coef1
        .lt(1.0 - cfg.epsilon_low)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&adv_neg)?;
    let high = coef1
        .gt(1.0 + cfg.epsilon_high)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&adv_pos)?;
    let region = (&low + &high)?.clamp(0.0, 1.0)?;
    Ok([low, high, region])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t2(rows: &[&[f32]]) -> Tensor {
        let cols = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).unwrap()
    }
    fn t1(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }
    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f32>().unwrap() as f64
    }
    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-5, "{a} != {b}");
    }
    fn cfg(loss_type: LossType, is: ImportanceSampling) -> GrpoLossConfig {
        GrpoLossConfig {
            loss_type,
            importance_sampling: is,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            max_completion_length: 4,
        }
    }
    fn micro<'a>(
        pol: &'a Tensor,
        (old, reference): (Option<&'a Tensor>, Option<&'a Tensor>),
        mask: &'a Tensor,
        adv: &'a Tensor,
    ) -> MicroBatch<'a> {
        MicroBatch {
            policy_logps: pol,
            old_logps: old,
            ref_logps: reference,
            mask,
            advantages: adv,
        }
    }
    const ONE: StepShape = StepShape {
        grad_accum_steps: 1,
        step_tokens: 5.0,
    };

    #[test]
    fn group_advantages_use_unbiased_std_plus_eps() {
        // Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735.
        let a = compute_advantages(
            &[1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0],
            4,
            AdvantageScaling::Group,
        )
        .unwrap();
        let s = (1.0f64 / 3.0).sqrt();
        close(a.values[0], 0.5 / (s + 1e-4));
        close(a.values[1], -0.5 / (s + 1e-4));
        assert_eq!(&a.values[4..], &[0.0; 4]);
        close(a.group_std[0], s);
        close(a.frac_zero_std, 0.5);
    }

    #[test]
    fn batch_scaling_centres_by_group_but_divides_by_batch_std() {
        let rewards = [1.0, 3.0, 10.0, 14.0];
        let a = compute_advantages(&rewards, 2, AdvantageScaling::Batch).unwrap();
        // batch mean 7, deviations -6 -4 3 7 -> sum sq 110, unbiased var 110/3.
        let std = (110.0f64 / 3.0).sqrt() + 1e-4;
        close(a.values[0], -1.0 / std);
        close(a.values[3], 2.0 / std);
        let none = compute_advantages(&rewards, 2, AdvantageScaling::None).unwrap();
        assert_eq!(none.values, vec![-1.0, 1.0, -2.0, 2.0]);
        assert!(compute_advantages(&rewards, 3, AdvantageScaling::Group).is_err());
    }

    #[test]
    fn k3_matches_formula_and_is_zero_on_agreement() {
        let r = t1(&[-1.0, -2.0, -0.5]);
        let p = t1(&[-1.0, -1.5, -1.0]);
        let kl = k3_kl(&r, &p).unwrap().to_vec1::<f32>().unwrap();
        close(kl[0] as f64, 0.0);
        let d = -0.5f64;
        close(kl[1] as f64, d.exp() - d - 1.0);
        let d = 0.5f64;
        close(kl[2] as f64, d.exp() - d - 1.0);
    }

    /// Two completions of lengths 3 and 2; ratio 1 (old = None).
    fn ratio_one_batch() -> (Tensor, Tensor, Tensor) {
        let pol = t2(&[&[-1.0, -2.0, -3.0, 0.0], &[-0.5, -0.5, 0.0, 0.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0, 0.0], &[1.0, 1.0, 0.0, 0.0]]);
        let adv = t1(&[1.0, -2.0]);
        (pol, mask, adv)
    }

    #[test]
    fn loss_types_aggregate_as_trl_at_ratio_one() {
        let (pol, mask, adv) = ratio_one_batch();
        let mb = micro(&pol, (None, None), &mask, &adv);
        let run = |lt| {
            scalar(
                &grpo_loss(&cfg(lt, ImportanceSampling::Token), &mb, ONE)
                    .unwrap()
                    .loss,
            )
        };
        // per-token loss = -A: row0 -1 x3, row1 +2 x2.
        close(run(LossType::Grpo), ((-3.0 / 3.0) + (4.0 / 2.0)) / 2.0);
        close(run(LossType::Bnpo), (-3.0 + 4.0) / 5.0);
        close(run(LossType::DrGrpo), (-3.0 + 4.0) / (2.0 * 4.0));
        close(run(LossType::Dapo), (-3.0 + 4.0) / 5.0);
        let shape = StepShape {
            grad_accum_steps: 2,
            step_tokens: 10.0,
        };
        let run2 = |lt| {
            scalar(
                &grpo_loss(&cfg(lt, ImportanceSampling::Token), &mb, shape)
                    .unwrap()
                    .loss,
            )
        };
        close(run2(LossType::Grpo), 0.5 / 2.0);
        close(run2(LossType::Bnpo), 0.2 / 2.0);
        close(run2(LossType::DrGrpo), 0.125 / 2.0);
        close(run2(LossType::Dapo), 1.0 / 10.0);
    }

    #[test]
    fn gradient_at_ratio_one_is_minus_advantage_over_tokens() {
        let pol =
            Var::from_tensor(&t2(&[&[-1.0, -2.0, -3.0, 0.0], &[-0.5, -0.5, 0.0, 0.0]])).unwrap();
        let (_, mask, adv) = ratio_one_batch();
        let mb = MicroBatch {
            policy_logps: pol.as_tensor(),
            old_logps: None,
            ref_logps: None,
            mask: &mask,
            advantages: &adv,
        };
        let out = grpo_loss(&cfg(LossType::Grpo, ImportanceSampling::Token), &mb, ONE).unwrap();
        let g = out.loss.backward().unwrap();
        let g = g.get(pol.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d/dlogp of -A * exp(logp - sg(logp)) = -A; grpo weights 1/(2 * len).
        close(g[0][0] as f64, -1.0 / 6.0);
        close(g[0][3] as f64, 0.0);
        close(g[1][1] as f64, 2.0 / 4.0);
        assert_eq!(out.stats.clip_region, 0.0);
    }

    #[test]
    fn token_level_clipping_and_clip_fractions() {
        // Row 0 (A = +1): log-ratios ln 1.5, ln 1.1, 0 -> ratio 1.5 clipped to 1.2 (high).
        // Row 1 (A = -1): ratios 0.5 (clipped to 0.8: low), 1.0.
        let pol = t2(&[&[1.5f32.ln(), 1.1f32.ln(), 0.0], &[0.5f32.ln(), 0.0, 0.0]]);
        let old = t2(&[&[0.0, 0.0, 0.0], &[0.0, 0.0, 0.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
        let adv = t1(&[1.0, -1.0]);
        let mb = micro(&pol, (Some(&old), None), &mask, &adv);
        let out = grpo_loss(&cfg(LossType::Bnpo, ImportanceSampling::Token), &mb, ONE).unwrap();
        // row0: -min(r, clip r) = -(1.2) , -(1.1), -(1.0); row1 (A=-1): -min(-r, -clip r) = max(r, clip r): 0.8, 1.0
        close(scalar(&out.loss), (-1.2 - 1.1 - 1.0 + 0.8 + 1.0) / 5.0);
        close(out.stats.clip_high, 1.0 / 5.0);
        close(out.stats.clip_low, 1.0 / 5.0);
        close(out.stats.clip_region, 2.0 / 5.0);
    }

    #[test]
    fn sequence_level_ratio_is_exp_of_mean_log_ratio() {
        // Row 0 log-ratios 0.3, 0.1 (mask 1,1) -> exp(0.2) = 1.2214 -> clipped to 1.2 for A > 0.
        // Row 1 log-ratios 0.1, [pad 5.0] -> exp(0.1) = 1.10517, inside the band.
        let pol = t2(&[&[0.3, 0.1], &[0.1, 5.0]]);
        let old = t2(&[&[0.0, 0.0], &[0.0, 0.0]]);
        let mask = t2(&[&[1.0, 1.0], &[1.0, 0.0]]);
        let adv = t1(&[1.0, 2.0]);
        let mb = micro(&pol, (Some(&old), None), &mask, &adv);
        let out = grpo_loss(&cfg(LossType::Grpo, ImportanceSampling::Sequence), &mb, ONE).unwrap();
        let r1 = 0.1f64.exp();
        close(scalar(&out.loss), (-1.2 + -2.0 * r1) / 2.0);
        // Sequence level: clip fraction is the share of sequences.
        close(out.stats.clip_high, 0.5);
    }

    #[test]
    fn beta_adds_k3_kl_per_token() {
        let (pol, mask, adv) = ratio_one_batch();
        let reference = t2(&[&[-1.5, -2.0, -3.0, 0.0], &[-0.5, 0.0, 0.0, 0.0]]);
        let mut c = cfg(LossType::Bnpo, ImportanceSampling::Token);
        c.beta = 0.5;
        let mb = micro(&pol, (None, Some(&reference)), &mask, &adv);
        let out = grpo_loss(&c, &mb, ONE).unwrap();
        let k = |d: f64| d.exp() - d - 1.0;
        let kl_sum = k(-0.5) + k(0.5);
        close(out.stats.kl.unwrap(), kl_sum / 5.0);
        close(scalar(&out.loss), (1.0 + 0.5 * kl_sum) / 5.0);
        let missing = MicroBatch {
            ref_logps: None,
            ..mb
        };
        assert!(grpo_loss(&c, &missing, ONE).is_err());
    }

    #[test]
    fn reference_at_beta_zero_is_logged_but_leaves_the_loss_alone() {
        let (pol, mask, adv) = ratio_one_batch();
        let reference = t2(&[&[-1.5, -2.0, -3.0, 0.0], &[-0.5, 0.0, 0.0, 0.0]]);
        let c = cfg(LossType::Bnpo, ImportanceSampling::Token);
        let with_ref = micro(&pol, (None, Some(&reference)), &mask, &adv);
        let without = MicroBatch {
            ref_logps: None,
            ..with_ref
        };
        let logged = grpo_loss(&c, &with_ref, ONE).unwrap();
        let plain = grpo_loss(&c, &without, ONE).unwrap();
        let k = |d: f64| d.exp() - d - 1.0;
        close(logged.stats.kl.unwrap(), (k(-0.5) + k(0.5)) / 5.0);
        assert_eq!(plain.stats.kl, None);
        assert_eq!(
            scalar(&logged.loss).to_bits(),
            scalar(&plain.loss).to_bits()
        );
    }
}
