//! What the engine's benchmarks share: one small stage kind, and the quiet in-process run the
//! integration tests use (their `support/workdir.rs`, compiled in here too).

use emflow_engine::{KindInfo, KindSpec, ParamSpec, ParamType, StageContext, StageKind};
use serde_json::json;

// The tests' run fixture; the benches use its quiet run only (`plan` not even that).
#[allow(dead_code)]
#[path = "../../tests/it/support/workdir.rs"]
mod workdir;
#[allow(unused_imports)]
pub use workdir::run_quiet;

/// Reads any number of files (only their paths: wiring is what the benches measure) and
/// writes params `cell` and `seed` to `out`, so that every stage commits its own bytes. The
/// rest of its params give manifests something to reference and override.
pub struct Step;
impl StageKind for Step {
    fn spec(&self) -> KindSpec {
        let params = vec![
            ParamSpec::optional("lr", ParamType::Float, json!(0.001), "learning rate"),
            ParamSpec::optional("seed", ParamType::Int, json!(0), "seed"),
            ParamSpec::optional("cell", ParamType::String, json!(""), "what to write"),
            ParamSpec::optional("label", ParamType::String, json!(""), "label"),
            ParamSpec::optional("ops", ParamType::List, json!([]), "ops"),
        ];
        KindInfo::new("step", 1, "bench kind")
            .ports(
                "in*  in   file  inputs
                 out  out  file  output",
            )
            .into_spec(params, false)
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        // Read from the map: stages built by hand carry only some params.
        let params = ctx.params();
        let cell = params.get("cell").and_then(|v| v.as_str()).unwrap_or("");
        let seed = params.get("seed").and_then(|v| v.as_i64()).unwrap_or(0);
        std::fs::write(ctx.output_path("out"), format!("{cell}{seed}"))?;
        Ok(())
    }
}
