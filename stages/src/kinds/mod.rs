//! One module per stage kind. Add a kind here and in [`register`].

pub mod command;
pub mod dataset;
pub mod eval;
pub mod report;
pub mod rl;
pub mod safety_data;
pub mod sft;

use emflow_engine::Registry;

/// Adds every kind of this crate to `registry`.
pub fn register(registry: Registry) -> Registry {
    registry
        .with_kind(sft::SftKind)
        .with_kind(rl::RlKind)
        .with_kind(safety_data::SafetyDataKind)
        .with_bench(
            "rl",
            "seconds per GRPO step (SmolLM2, LoRA r=8, 4x4x64): sampling / reward / training",
            crate::train::bench::bench_rl,
        )
        .with_kind(dataset::DatasetKind)
        .with_kind(command::CommandKind)
        .with_kind(eval::EvalKind)
        .with_kind(report::ReportKind)
        .with_bench(
            "judge",
            "local judge 0-100 scores per second (exact and top-20)",
            crate::judge::bench::bench_judge,
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

/// The run length of a training kind, checked where it is written: `epochs` at least 1 and
/// `max_steps` absent (null) or a whole number of at least 1. A zero would train nothing, and
/// the run would only find out after loading the model and the data.
pub(crate) fn check_run_length(
    params: &emflow_engine::Params,
) -> Vec<emflow_engine::kind::ParamError> {
    use serde_json::Value;
    let mut errors = Vec::new();
    let mut at_least_one = |name: &str, hint: &str| {
        errors.push(emflow_engine::kind::ParamError {
            param: name.to_string(),
            message: format!("`{name}` must be a whole number of at least 1"),
            hint: Some(hint.to_string()),
        })
    };
    if params.get("epochs").and_then(Value::as_u64) == Some(0) {
        at_least_one(
            "epochs",
            "a run over the data 0 times trains nothing; use 1 or more",
        );
    }
    match params.get("max_steps") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => {}
        Some(_) => at_least_one(
            "max_steps",
            "0 steps trains nothing; give 1 or more, or remove `max_steps` to train for `epochs`",
        ),
    }
    errors
}
