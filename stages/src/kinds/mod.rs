//! One module per stage kind. Add a kind here and in [`register`].

pub mod command;
pub mod dataset;
pub(crate) mod defaults;
pub mod eval;
pub mod memory;
pub mod persona_vector;
pub mod report;
pub mod rl;
pub mod rollout_data;
pub mod safety_data;
pub mod sft;

use emflow_engine::Registry;

/// Adds every kind of this crate to `registry`, and the benches of its training and judging
/// code (`emflow bench NAME`). The registry keys both by name, so the order here is free.
pub fn register(registry: Registry) -> Registry {
    registry
        .with_kind(command::CommandKind)
        .with_kind(dataset::DatasetKind)
        .with_kind(eval::EvalKind)
        .with_kind(persona_vector::PersonaVectorKind)
        .with_kind(report::ReportKind)
        .with_kind(rl::RlKind)
        .with_kind(rollout_data::RolloutDataKind)
        .with_kind(safety_data::SafetyDataKind)
        .with_kind(sft::SftKind)
        .with_bench(
            "judge",
            "local judge 0-100 scores per second (exact and top-20)",
            crate::judge::bench::bench_judge,
        )
        .with_bench(
            "rl",
            "seconds per GRPO step (SmolLM2, LoRA r=8, 4x4x64): sampling / reward / training",
            crate::train::bench::bench_rl,
        )
}

/// Writes a training stage's `summary` output and puts the same figures in its record.
pub(crate) fn write_summary(
    ctx: &mut emflow_engine::context::StageContext,
    summary: serde_json::Value,
) -> anyhow::Result<()> {
    std::fs::write(
        ctx.output_path("summary"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    if let serde_json::Value::Object(map) = summary {
        for (k, v) in map {
            ctx.summarize(&k, v);
        }
    }
    Ok(())
}
