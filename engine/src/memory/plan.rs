//! The memory estimate of a whole plan: for each selected stage that puts a model on a GPU
//! (`resources.gpus > 0` and a kind that declares a [`MemoryDemand`]), the model's shape, the
//! estimate, and whether it fits the device's memory; what `emflow run --dry-run`, `emflow
//! plan` and a real run print and check before anything runs.

use std::collections::BTreeSet;

use serde_json::json;

use super::{estimate, gib, refusal, summary_line, Estimate, MemoryDemand, ModelShape};
use crate::console::Reporter;
use crate::pipeline::{InputRef, StageInstance};
use crate::plan::Planner;

/// One stage's line in the plan's memory table.
#[derive(Clone, Debug)]
pub struct StageMemory {
    pub id: String,
    /// The estimate and where the model's shape came from; `Err` says why there is none.
    pub estimate: Result<(Estimate, String), String>,
    /// Whether the stage trains (so the activation terms apply).
    pub training: bool,
    /// The memory of one of its GPUs (declared, else reported by the driver); `None` unknown.
    pub device: Option<u64>,
    /// Why it cannot fit, and what to change ([`super::refusal`]: what the stage needs).
    pub refusal: Option<String>,
}

/// Every selected GPU stage's estimate.
#[derive(Clone, Debug, Default)]
pub struct MemoryPlan {
    pub stages: Vec<StageMemory>,
}

impl MemoryPlan {
    /// The estimates of the `selection`'s GPU stages. `driver_memory` is asked (once, and
    /// only if some stage declares no `gpu_memory`) for the memory of this machine's GPUs.
    pub fn of(
        planner: &Planner,
        selection: &BTreeSet<usize>,
        driver_memory: impl FnOnce() -> Option<u64>,
    ) -> MemoryPlan {
        let mut driver_memory = Some(driver_memory);
        let mut reported: Option<u64> = None;
        let mut stages = Vec::new();
        for &i in selection {
            let stage = planner.stage(i);
            if stage.resources.gpus == 0 {
                continue;
            }
            let Some(kind) = planner.registry.kind(&stage.kind) else {
                continue;
            };
            let Some(demand) = kind.memory_demand(&stage.params) else {
                continue;
            };
            let device = match stage.resources.gpu_memory {
                0 => {
                    if let Some(ask) = driver_memory.take() {
                        reported = ask();
                    }
                    reported
                }
                declared => Some(declared),
            };
            let dtype = kind.spec().precision.cuda.bytes();
            stages.push(stage_memory(planner, stage, &demand, dtype, device));
        }
        MemoryPlan { stages }
    }

    /// The table: one line per GPU stage, then the refusals.
    pub fn print(&self, r: &Reporter) {
        if self.stages.is_empty() {
            return;
        }
        r.line(&format!(
            "\n{} (per GPU stage; docs/memory.md says how it is reckoned):",
            r.bold("GPU memory")
        ));
        for s in &self.stages {
            let text = match &s.estimate {
                Ok((e, origin)) => {
                    let device = s.device.map_or("device memory unknown".to_string(), |d| {
                        format!("device {}", gib(d))
                    });
                    format!("{}; {device}; model {origin}", summary_line(e, s.training))
                }
                Err(why) => format!("no estimate: {why}"),
            };
            r.line(&format!("  {:<44} {text}", s.id));
            r.event("memory", self.event(s));
        }
        for why in self.refusals() {
            r.line(&format!("refused: {why}"));
        }
    }

    /// The refusals, one line per stage family (the name before `[`) whose stages fail the
    /// same way: a 14B plan on a small card refuses hundreds of matrix instances with one
    /// reason, and a user wants the reason once with the count, not 640 near-identical lines.
    fn refusals(&self) -> Vec<String> {
        // (family, reason, the ids), in plan order.
        let mut groups: Vec<(&str, &str, Vec<&str>)> = Vec::new();
        for s in &self.stages {
            let Some(reason) = s.refusal.as_deref() else {
                continue;
            };
            let family = s.id.split('[').next().unwrap_or(&s.id);
            match groups
                .iter_mut()
                .find(|(f, r, _)| (*f, *r) == (family, reason))
            {
                Some((_, _, ids)) => ids.push(&s.id),
                None => groups.push((family, reason, vec![&s.id])),
            }
        }
        groups
            .into_iter()
            .map(|(family, reason, ids)| match ids.as_slice() {
                [first, .., last] => format!(
                    "{} stages of {family} ({first} ... {last}) each need {reason}",
                    ids.len()
                ),
                [one] => format!("stage {one} needs {reason}"),
                [] => reason.to_string(), // a group starts with one stage
            })
            .collect()
    }

    fn event(&self, s: &StageMemory) -> serde_json::Value {
        match &s.estimate {
            Ok((e, origin)) => json!({
                "stage": s.id, "estimate": e, "total": e.total(), "device": s.device,
                "shape": origin,
                "refusal": s.refusal.as_ref().map(|why| format!("stage {} needs {why}", s.id)),
            }),
            Err(why) => json!({ "stage": s.id, "unknown": why }),
        }
    }

    /// `Err` naming every stage that cannot fit its device (grouped as in [`Self::print`]),
    /// with what to change.
    pub fn check(&self) -> anyhow::Result<()> {
        let refusals = self.refusals();
        if refusals.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "the plan cannot fit its GPUs, so nothing ran:\n  {}",
            refusals.join("\n  ")
        )
    }
}

/// The estimate of one stage, with its shape looked up from the model it reads.
fn stage_memory(
    planner: &Planner,
    stage: &StageInstance,
    demand: &MemoryDemand,
    dtype_bytes: u64,
    device: Option<u64>,
) -> StageMemory {
    let estimate = model_shape(planner, stage).and_then(|shape| {
        estimate(&shape, demand, dtype_bytes)
            .map(|e| (e, shape.origin.clone()))
            .map_err(|e| format!("{e:#}"))
    });
    let refusal = match (&estimate, device) {
        (Ok((e, _)), Some(d)) => refusal(e, demand, d),
        _ => None,
    };
    StageMemory {
        id: stage.id.clone(),
        estimate,
        training: demand.training.is_some(),
        device,
        refusal,
    }
}

/// The shape of the model on the stage's `model` port: its config.json when the model is a
/// local folder or already fetched, else the `shape:` its manifest entry declares.
fn model_shape(planner: &Planner, stage: &StageInstance) -> Result<ModelShape, String> {
    let name = match stage.inputs.get("model").and_then(|v| v.first()) {
        Some(InputRef::Model { name }) => name,
        _ => return Err("its `model` input is not a `models:` entry".into()),
    };
    let input = crate::judge_cost::model_input(planner, name);
    if let Some(a) = input.artifact.as_ref().filter(|a| a.path.is_dir()) {
        if let Some(shape) = ModelShape::from_hf_dir(&a.path).map_err(|e| format!("{e:#}"))? {
            return Ok(shape);
        }
    }
    match planner
        .pipeline
        .models
        .get(name)
        .and_then(|d| d.shape.as_ref())
    {
        Some(decl) => ModelShape::from_decl(decl).map_err(|e| format!("{e:#}")),
        None => Err(format!(
            "the shape of models.{name} is unknown before it is fetched; declare it, e.g. \
             `models: {{ {name}: {{ source: ..., shape: qwen3-14b }} }}`"
        )),
    }
}
