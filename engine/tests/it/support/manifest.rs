//! Small stage kinds and helpers shared by the manifest front-end tests.

use std::path::Path;

use emflow_engine::diagnostics::{ManifestErrors, Problem};
use emflow_engine::expand::{load_manifest_str, LoadOptions, LoadedManifest};
use emflow_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, Params, PortSpec, Registry, StageKind,
};
use emflow_engine::{ModelFetcher, StageContext};
use serde_json::json;

/// Makes messages: `n` rows, optional ops (`take` must be >= 0, checked by `check`).
pub struct Gen;
impl StageKind for Gen {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "gen",
            version: 1,
            summary: "test data",
            params: vec![
                ParamSpec::required("n", ParamType::Int, "rows to make"),
                ParamSpec::optional("lr", ParamType::Float, json!(0.5), "a float"),
                ParamSpec::optional(
                    "mode",
                    ParamType::Enum(vec!["fast".into(), "slow".into()]),
                    json!("fast"),
                    "speed",
                ),
                ParamSpec::optional("ops", ParamType::List, json!([]), "operations"),
                ParamSpec::optional("label", ParamType::String, json!(""), "a label"),
                ParamSpec::optional("flag", ParamType::Bool, json!(false), "a flag"),
                ParamSpec::optional("extra", ParamType::Any, json!(null), "anything"),
            ],
            open_params: false,
            precision: Default::default(),
            inputs: vec![PortSpec::optional_input(
                "source",
                ArtifactType::File,
                "a source file",
            )],
            outputs: vec![PortSpec::output("data", ArtifactType::Messages, "rows")],
        }
    }
    fn check(&self, params: &Params) -> Result<(), Vec<ParamError>> {
        let mut errors = Vec::new();
        if let Some(ops) = params["ops"].as_array() {
            for (i, op) in ops.iter().enumerate() {
                if op
                    .get("take")
                    .and_then(|t| t.as_i64())
                    .is_some_and(|t| t < 0)
                {
                    errors.push(ParamError {
                        param: format!("ops.{i}.take"),
                        message: "`take` must not be negative".into(),
                        hint: Some("use 0 or more".into()),
                    });
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
    fn run(&self, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Trains on messages from a model: outputs an adapter and metrics.
pub struct Train;
impl StageKind for Train {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "train",
            version: 1,
            summary: "test training",
            params: vec![
                ParamSpec::optional("seed", ParamType::Int, json!(0), "seed"),
                ParamSpec::optional("lr", ParamType::Float, json!(0.0001), "learning rate"),
                ParamSpec::optional("domain", ParamType::String, json!(""), "domain"),
            ],
            open_params: false,
            precision: Default::default(),
            inputs: vec![
                PortSpec::input("data", ArtifactType::Messages, "training data"),
                PortSpec::optional_input("model", ArtifactType::Model, "base model"),
            ],
            outputs: vec![
                PortSpec::output("adapter", ArtifactType::Adapter, "weights"),
                PortSpec::output("metrics", ArtifactType::Metrics, "curves"),
            ],
        }
    }
    fn run(&self, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Evaluates an adapter.
pub struct Eval;
impl StageKind for Eval {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "eval",
            version: 1,
            summary: "test eval",
            params: vec![ParamSpec::optional(
                "seed",
                ParamType::Int,
                json!(0),
                "seed",
            )],
            open_params: false,
            precision: Default::default(),
            inputs: vec![PortSpec::input(
                "adapter",
                ArtifactType::Adapter,
                "what to evaluate",
            )],
            outputs: vec![PortSpec::output("summary", ArtifactType::Summary, "scores")],
        }
    }
    fn run(&self, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Collects summaries (a many-port).
pub struct Report;
impl StageKind for Report {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "report",
            version: 1,
            summary: "test report",
            params: vec![],
            open_params: false,
            precision: Default::default(),
            inputs: vec![PortSpec::many_input(
                "summaries",
                ArtifactType::Summary,
                "all summaries",
            )],
            outputs: vec![PortSpec::output(
                "report",
                ArtifactType::Report,
                "the report",
            )],
        }
    }
    fn run(&self, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Open params; outputs named by the `outputs` param.
pub struct Cmd;
impl StageKind for Cmd {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "cmd",
            version: 1,
            summary: "test command",
            params: vec![
                ParamSpec::required("run", ParamType::String, "shell"),
                ParamSpec::optional("outputs", ParamType::List, json!([]), "output names"),
            ],
            open_params: true,
            precision: Default::default(),
            inputs: vec![PortSpec::many_input("files", ArtifactType::File, "inputs")],
            outputs: vec![],
        }
    }
    fn outputs(&self, params: &Params) -> Vec<PortSpec> {
        params["outputs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .map(|n| PortSpec::output(n, ArtifactType::File, "declared"))
            .collect()
    }
    fn run(&self, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

pub struct PipFetcher;
impl ModelFetcher for PipFetcher {
    fn schemes(&self) -> &'static [&'static str] {
        &["pip", "hf"]
    }
    fn fetch(&self, _: &str, _: &Path, _: &dyn emflow_engine::Progress) -> anyhow::Result<()> {
        anyhow::bail!("tests fetch nothing")
    }
}

pub fn registry() -> Registry {
    Registry::new()
        .with_kind(Gen)
        .with_kind(Train)
        .with_kind(Eval)
        .with_kind(Report)
        .with_kind(Cmd)
        .with_fetcher(PipFetcher)
}

pub const PATH: &str = "m.yaml";

pub fn load_with(src: &str, opts: &LoadOptions) -> Result<LoadedManifest, ManifestErrors> {
    load_manifest_str(src, Path::new(PATH), opts, &registry())
}

pub fn load(src: &str) -> LoadedManifest {
    match load_with(src, &LoadOptions::default()) {
        Ok(l) => l,
        Err(e) => panic!("expected the manifest to load, got:\n{}", e.render_plain()),
    }
}

pub fn errors_with(src: &str, opts: &LoadOptions) -> ManifestErrors {
    match load_with(src, opts) {
        Ok(_) => panic!("expected the manifest to fail"),
        Err(e) => e,
    }
}

pub fn errors(src: &str) -> ManifestErrors {
    errors_with(src, &LoadOptions::default())
}

/// Finds the problem whose message contains `message`, checks its `file:line:col` (also in
/// miette's rendering) and that its help contains `help`. Returns the problem.
pub fn expect_problem<'e>(
    errs: &'e ManifestErrors,
    message: &str,
    at: &str,
    help: &str,
) -> &'e Problem {
    let rendered = errs.render_plain();
    let Some(p) = errs.problems().iter().find(|p| p.message.contains(message)) else {
        panic!("no problem mentioning {message:?}; got:\n{rendered}");
    };
    let loc = errs.location(p).unwrap_or_default();
    assert_eq!(loc, at, "location of {:?}\n{rendered}", p.message);
    assert!(
        rendered.contains(&format!("[{at}]")),
        "rendering lacks [{at}]:\n{rendered}"
    );
    let h = p.help.clone().unwrap_or_default();
    assert!(
        h.contains(help),
        "help of {:?} is {h:?}, expected it to contain {help:?}",
        p.message
    );
    assert!(
        rendered.contains(help.lines().next().unwrap_or("")),
        "rendering lacks the help:\n{rendered}"
    );
    p
}
