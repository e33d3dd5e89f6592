//! A typed kind's params struct is all the engine needs to point at a manifest's mistakes:
//! an unknown param, a value of the wrong type and a value out of range are each reported at
//! the value's line and column, with a hint taken from the derived spec (type, range, doc).

use std::path::Path;

use emflow_engine::context::StageContext;
use emflow_engine::diagnostics::{ManifestErrors, Problem};
use emflow_engine::expand::{load_manifest_str, LoadOptions};
use emflow_engine::{ArtifactType, Kind, KindInfo, PortSpec, Registry};
use schemars::JsonSchema;
use serde::Deserialize;

/// A training kind with the usual kinds of params.
struct Train;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct TrainParams {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    #[schemars(range(min = 0.0, max = 1.0))]
    lr: f64,
    /// Optimizer steps; null = one epoch.
    #[serde(default)]
    #[schemars(range(min = 1))]
    max_steps: Option<u64>,
    /// Seed for the data order.
    #[serde(default)]
    seed: u64,
}

fn default_lr() -> f64 {
    1e-4
}

impl Kind for Train {
    type Params = TrainParams;

    fn describe(&self) -> KindInfo {
        KindInfo::new("train", 1, "a toy trainer").outputs(vec![PortSpec::output(
            "out",
            ArtifactType::File,
            "a file",
        )])
    }

    fn run(&self, _: &mut StageContext, _: &TrainParams) -> anyhow::Result<()> {
        Ok(())
    }
}

fn load(params: &str) -> Result<emflow_engine::expand::LoadedManifest, ManifestErrors> {
    let src = format!("emflow: 1\nstages:\n  t:\n    kind: train\n    params:\n{params}");
    let registry = Registry::new().with_kind(Train);
    load_manifest_str(
        &src,
        Path::new("m.yaml"),
        &LoadOptions::default(),
        &registry,
    )
}

/// The one problem of a manifest that must fail, with its `file:line:col`.
fn the_problem(params: &str) -> (String, Problem) {
    let errors = match load(params) {
        Ok(_) => panic!("expected an error for\n{params}"),
        Err(e) => e,
    };
    let [problem] = errors.problems() else {
        panic!("expected one problem, got:\n{}", errors.render_plain());
    };
    (
        errors.location(problem).unwrap_or_default(),
        problem.clone(),
    )
}

#[test]
fn an_unknown_param_is_located_at_its_name_with_a_did_you_mean() {
    let (at, p) = the_problem("      lr: 0.1\n      sed: 3\n");
    assert_eq!(at, "m.yaml:7:7");
    assert_eq!(p.message, "stage `t`: unknown param `sed` for kind `train`");
    assert_eq!(p.help.as_deref(), Some("did you mean `seed`?"));
}

#[test]
fn a_value_of_the_wrong_type_is_located_with_the_declared_type_and_doc() {
    let (at, p) = the_problem("      max_steps: many\n");
    assert_eq!(at, "m.yaml:6:18");
    assert_eq!(
        p.message,
        "stage `t`: param `max_steps` must be an integer, not a string"
    );
    assert_eq!(
        p.help.as_deref(),
        Some(
            "`max_steps` of kind `train` is an integer >= 1 or null: \
             Optimizer steps; null = one epoch."
        )
    );
}

#[test]
fn a_value_out_of_the_declared_range_is_located_with_the_range() {
    let (at, p) = the_problem("      lr: 2\n");
    assert_eq!(at, "m.yaml:6:11");
    assert_eq!(p.message, "stage `t`: param `lr` must be in [0, 1], not 2");
    assert_eq!(
        p.help.as_deref(),
        Some("`lr` of kind `train` is a number in [0, 1]: Peak learning rate.")
    );
    let (at, p) = the_problem("      max_steps: 0\n");
    assert_eq!(at, "m.yaml:6:18");
    assert_eq!(
        p.message,
        "stage `t`: param `max_steps` must be >= 1, not 0"
    );
}

#[test]
fn values_in_range_plan_with_defaults_from_the_struct() {
    let loaded = load("      max_steps: null\n      lr: 1\n").unwrap();
    let params = &loaded.pipeline.stages[0].params;
    // A float param written as an integer is a float (and keys as one); absent ones are
    // the struct's defaults.
    assert_eq!(params["lr"], serde_json::json!(1.0));
    assert_eq!(params["seed"], serde_json::json!(0));
    assert_eq!(params["max_steps"], serde_json::Value::Null);
}
