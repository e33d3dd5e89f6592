//! AdamW, gradient clipping and accumulation, learning-rate schedules.
//!
//! Written here rather than taken from candle-nn because a training stage must be able to stop
//! and resume bit-exactly: candle-nn's AdamW keeps its moments private, so its state cannot be
//! saved. This one keeps f32 moments per trainable var, visits vars in the fixed (name) order
//! they are given in, and saves moments plus step counters to one safetensors file. The update
//! follows `torch.optim.AdamW` operation by operation (decoupled decay `p *= 1 - lr*wd`, then
//! `p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`), and the schedules follow
//! transformers' `get_*_schedule_with_warmup` formulas, so hyper-parameters from papers using
//! TRL mean the same thing here.
//!
//! `adamw_host` is the update fused into one pass over host memory (built on `ops::cpu`).
//! Called by the stages crate's training loops and `bench`; knows nothing about models.

mod adamw_host;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use adamw_host::HostAdamW;

/// AdamW hyper-parameters (torch's defaults: betas 0.9/0.999, eps 1e-8, weight decay 0.01).
/// The learning rate is not one of them: every [`AdamW::step`] takes the value its
/// [`LrSchedule`] gives for that step, the one source of the learning rate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// torch's defaults with another weight decay (what a training stage sets).
    pub fn with_weight_decay(weight_decay: f64) -> Self {
        Self {
            weight_decay,
            ..Self::default()
        }
    }
}

/// Whether transformers' `Trainer` applies weight decay to a parameter of this name: every
/// parameter except biases and normalisation weights.
pub fn transformers_decays(name: &str) -> bool {
    !(name.contains("bias") || name.contains("norm"))
}

/// First and second moments of one parameter.
enum Moments {
    /// f32 parameters in host memory: updated in place by [`HostAdamW`] in one pass.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Anywhere else: updated with tensor ops on the parameter's device.
    Device { m: Tensor, v: Tensor },
}

impl Moments {
    fn zeros(var: &Var) -> Result<Self> {
        Ok(if var.device().is_cpu() && var.dtype() == DType::F32 {
            let n = var.elem_count();
            Moments::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }
        } else {
            let m = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            Moments::Device { v: m.clone(), m }
        })
    }

    /// Both moments as tensors shaped like `var` (for saving).
    fn tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v } => (
                Tensor::from_slice(m, var.shape(), var.device())?,
                Tensor::from_slice(v, var.shape(), var.device())?,
            ),
            Moments::Device { m, v } => (m.clone(), v.clone()),
        })
    }

    /// Replaces both moments with saved values (already checked to be shaped like the var).
    fn restore(&mut self, m: Tensor, v: Tensor) -> Result<()> {
        match self {
            Moments::Host { m: hm, v: hv } => {
                *hm = m.flatten_all()?.to_vec1::<f32>()?;
                *hv = v.flatten_all()?.to_vec1::<f32>()?;
            }
            Moments::Device { m: dm, v: dv } => {
                *dm = m.to_device(dm.device())?;
                *dv = v.to_device(dv.device())?;
            }
        }
        Ok(())
    }
}

struct ParamState {
    name: String,
    var: Var,
    moments: Moments,
    /// Updates this var received (torch keeps one per parameter: vars without a gradient
    /// in a step do not advance their bias correction).
    steps: u64,
    decays: bool,
}

/// AdamW over a fixed, named list of vars.
pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    step_count: u64,
}

const STEP_COUNT_KEY: &str = "__step_count__";
const VAR_STEPS_KEY: &str = "__var_steps__";

impl AdamW {
    /// `vars` in the order they are to be visited (callers pass them sorted by name). Every
    /// var is decayed; see [`AdamW::set_weight_decay_filter`].
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if !seen.insert(name.clone()) {
                bail!("AdamW was given two vars named '{name}'");
            }
            params.push(ParamState {
                name,
                moments: Moments::zeros(&var)?,
                var,
                steps: 0,
                decays: true,
            });
        }
        Ok(Self {
            params,
            cfg,
            step_count: 0,
        })
    }

    /// Chooses which vars get weight decay (e.g. [`transformers_decays`]).
    pub fn set_weight_decay_filter(&mut self, decays: impl Fn(&str) -> bool) {
        for p in &mut self.params {
            p.decays = decays(&p.name);
        }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// One update at learning rate `lr` (the schedule's value for this step). Vars without a
    /// gradient in `grads` are left untouched, as torch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // Detached: a parameter's gradient is built from the forward activations, and a
            // moment computed from the tracked tensor would keep every step's graph alive.
            let grad = grad.detach().to_dtype(DType::F32)?;
            p.steps += 1;
            let t = p.steps as i32;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let decay = if p.decays && weight_decay != 0.0 {
                1.0 - lr * weight_decay
            } else {
                1.0
            };
            match &mut p.moments {
                Moments::Host { m, v } => {
                    let update = HostAdamW {
                        moments: Mutex::new((m.as_mut_slice(), v.as_mut_slice())),
                        beta1: beta1 as f32,
                        one_minus_beta1: (1.0 - beta1) as f32,
                        beta2: beta2 as f32,
                        one_minus_beta2: (1.0 - beta2) as f32,
                        eps: eps as f32,
                        step_size: (lr / bias_correction1) as f32,
                        bias_correction2_sqrt: bias_correction2_sqrt as f32,
                        decay: decay as f32,
                    };
                    p.var
                        .as_tensor()
                        .inplace_op2(&grad.contiguous()?, &update)
                        .with_context(|| format!("updating var '{}'", p.name))?;
                }
                Moments::Device { m, v } => {
                    *m = ((&*m * beta1)? + (&grad * (1.0 - beta1))?)?;
                    *v = ((&*v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
                    let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
                    let update = ((&*m / denom)? * (lr / bias_correction1))?;
                    let param = (p.var.as_tensor().detach().to_dtype(DType::F32)? * decay)?;
                    let new = (param - update)?.to_dtype(p.var.dtype())?;
                    p.var
                        .set(&new)
                        .with_context(|| format!("updating var '{}'", p.name))?;
                }
            }
        }
        self.step_count += 1;
        Ok(())
    }

    /// Number of `step` calls so far (also restored by `load`).
    pub fn step_count(&self) -> u64 {
        self.step_count
    }

    /// Writes the moments and step counters to `path` (safetensors). The weights themselves
    /// are saved by the model; together they resume a run bit-exactly.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for p in &self.params {
            let (m, v) = p.moments.tensors(&p.var)?;
            tensors.insert(format!("m.{}", p.name), m);
            tensors.insert(format!("v.{}", p.name), v);
        }
        let device = candle_core::Device::Cpu;
        let steps: Vec<i64> = self.params.iter().map(|p| p.steps as i64).collect();
        tensors.insert(VAR_STEPS_KEY.to_string(), Tensor::new(steps, &device)?);
        tensors.insert(
            STEP_COUNT_KEY.to_string(),
            Tensor::new(&[self.step_count as i64], &device)?,
        );
        candle_core::safetensors::save(&tensors, path)
            .with_context(|| format!("saving optimizer state to {}", path.display()))
    }

    /// Restores moments and step counters saved by [`AdamW::save`] for the same vars.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut saved = candle_core::safetensors::load(path, &device)
            .with_context(|| format!("loading optimizer state from {}", path.display()))?;
        let mut take = |key: &str| {
            saved.remove(key).ok_or_else(|| {
                anyhow!(
                    "optimizer state {} has no '{key}': it was saved for different vars",
                    path.display()
                )
            })
        };
        let step_count = take(STEP_COUNT_KEY)?.to_vec1::<i64>()?;
        let var_steps = take(VAR_STEPS_KEY)?.to_vec1::<i64>()?;
        if var_steps.len() != self.params.len() || step_count.len() != 1 {
            bail!(
                "optimizer state {} holds {} vars, this optimizer has {}",
                path.display(),
                var_steps.len(),
                self.params.len()
            );
        }
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let m = take(&format!("m.{}", p.name))?;
            let v = take(&format!("v.{}", p.name))?;
            if m.dims() != p.var.dims() || v.dims() != p.var.dims() {
                bail!(
                    "optimizer state {}: moments of '{}' have shape {:?}, the var has {:?}",
                    path.display(),
                    p.name,
                    m.dims(),
                    p.var.dims()
                );
            }
            restored.push((m.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?));
        }
        for ((p, (m, v)), steps) in self.params.iter_mut().zip(restored).zip(var_steps) {
            p.moments.restore(m, v)?;
            p.steps = steps as u64;
        }
        self.step_count = step_count[0] as u64;
        Ok(())
    }
}

/// Scales all gradients of `vars` so their global L2 norm is at most `max_norm`
/// (torch's `clip_grad_norm_`, coefficient `max_norm / (norm + 1e-6)`); returns the norm
/// before clipping. The sum of squares stays on the device; one scalar is read back.
pub fn clip_grad_norm(vars: &[(String, Var)], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let mut total: Option<Tensor> = None;
    for (_, var) in vars {
        let Some(g) = grads.get(var.as_tensor()) else {
            continue;
        };
        let sq = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
        total = Some(match total {
            None => sq,
            Some(t) => (t + sq)?,
        });
    }
    let Some(total) = total else { return Ok(0.0) };
    let norm = (total.to_scalar::<f32>()? as f64).sqrt();
    if !norm.is_finite() {
        bail!("gradient norm is {norm}: the loss produced non-finite gradients");
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, var) in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g.detach() * coef)?);
            }
        }
    }
    Ok(norm)
}

/// Adds `scale * grads` (only the gradients of `vars`; activations' gradients are dropped at
/// once to free memory) into the accumulator, creating it on first use.
pub fn accumulate(
    acc: &mut Option<GradStore>,
    vars: &[(String, Var)],
    grads: GradStore,
    scale: f64,
) -> Result<()> {
    let mut grads = grads;
    let store = acc.get_or_insert_with(GradStore::default);
    for (_, var) in vars {
        let Some(g) = grads.remove(var.as_tensor()) else {
            continue;
        };
        let g = if scale == 1.0 { g } else { (g * scale)? };
        let sum = match store.remove(var.as_tensor()) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        store.insert(var.as_tensor(), sum.detach());
    }
    Ok(())
}

/// The shape of the learning-rate curve after warm-up. (`JsonSchema`: a kind's `schedule`
/// param is declared by this type.)
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// A learning-rate schedule with linear warm-up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub kind: Schedule,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// The learning rate for the update after `step` updates have been made (0 for the first
    /// update), as transformers' `get_{constant,linear,cosine}_schedule_with_warmup` give it
    /// (so with warm-up the first update has learning rate 0, exactly as in TRL).
    pub fn lr_at(&self, step: usize) -> f64 {
        let step_f = step as f64;
        if step < self.warmup_steps {
            return self.base_lr * (step_f / self.warmup_steps.max(1) as f64);
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let factor = match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => (self.total_steps as f64 - step_f).max(0.0) / decay_steps,
            Schedule::Cosine => {
                // num_cycles = 0.5: half a cosine from 1 down to 0 over the decay steps.
                let progress = (step_f - self.warmup_steps as f64) / decay_steps;
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        };
        self.base_lr * factor
    }
}
