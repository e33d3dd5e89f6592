//! Small stage kinds and helpers shared by the manifest front-end tests.

use std::path::Path;

use emflow_engine::diagnostics::{ManifestErrors, Problem};
use emflow_engine::expand::{load_manifest_str, LoadOptions, LoadedManifest};
use emflow_engine::kind::{
    ArtifactType, KindInfo, KindSpec, ParamError, ParamSpec, ParamType, Params, PortSpec, Registry,
    StageKind,
};
use emflow_engine::{ModelFetcher, StageContext};
use serde_json::json;

/// Makes messages: `n` rows, optional ops (`take` must be >= 0, checked by `check`).
pub struct Gen;
impl StageKind for Gen {
    fn spec(&self) -> KindSpec {
        let speeds = ParamType::Enum(vec!["fast".into(), "slow".into()]);
        let params = vec![
            ParamSpec::required("n", ParamType::Int, "rows to make"),
            ParamSpec::optional("lr", ParamType::Float, json!(0.5), "a float"),
            ParamSpec::optional("mode", speeds, json!("fast"), "speed"),
            ParamSpec::optional("ops", ParamType::List, json!([]), "operations"),
            ParamSpec::optional("label", ParamType::String, json!(""), "a label"),
            ParamSpec::optional("flag", ParamType::Bool, json!(false), "a flag"),
            ParamSpec::optional("extra", ParamType::Any, json!(null), "anything"),
        ];
        KindInfo::new("gen", 1, "test data")
            .ports(
                "in?  source  file      a source file
                 out  data    messages  rows",
            )
            .into_spec(params, false)
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

/// A kind that is all declaration: the front-end tests plan it, and never run it.
pub struct Declared(KindSpec);
impl StageKind for Declared {
    fn spec(&self) -> KindSpec {
        self.0.clone()
    }
    fn run(&self, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Trains on messages from a model: outputs an adapter and metrics.
fn train() -> Declared {
    let params = vec![
        ParamSpec::optional("seed", ParamType::Int, json!(0), "seed"),
        ParamSpec::optional("lr", ParamType::Float, json!(0.0001), "learning rate"),
        ParamSpec::optional("domain", ParamType::String, json!(""), "domain"),
    ];
    let info = KindInfo::new("train", 1, "test training").ports(
        "in   data     messages  training data
         in?  model    model     base model
         out  adapter  adapter   weights
         out  metrics  metrics   curves",
    );
    Declared(info.into_spec(params, false))
}

/// Evaluates an adapter.
fn eval() -> Declared {
    let seed = ParamSpec::optional("seed", ParamType::Int, json!(0), "seed");
    let info = KindInfo::new("eval", 1, "test eval").ports(
        "in   adapter  adapter  what to evaluate
         out  summary  summary  scores",
    );
    Declared(info.into_spec(vec![seed], false))
}

/// Collects summaries (a many-port).
fn report() -> Declared {
    let info = KindInfo::new("report", 1, "test report").ports(
        "in*  summaries  summary  all summaries
         out  report     report   the report",
    );
    Declared(info.into_spec(vec![], false))
}

/// Open params; outputs named by the `outputs` param.
pub struct Cmd;
impl StageKind for Cmd {
    fn spec(&self) -> KindSpec {
        let params = vec![
            ParamSpec::required("run", ParamType::String, "shell"),
            ParamSpec::optional("outputs", ParamType::List, json!([]), "output names"),
        ];
        KindInfo::new("cmd", 1, "test command")
            .ports("in* files file inputs")
            .into_spec(params, true)
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
        .with_kind(train())
        .with_kind(eval())
        .with_kind(report())
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

/// Load options with a profile and `--set` arguments, as the CLI would pass them.
pub fn options(profile: Option<&str>, sets: &[&str]) -> LoadOptions {
    LoadOptions {
        profile: profile.map(String::from),
        sets: sets.iter().map(|s| s.to_string()).collect(),
    }
}

/// One expected problem: its message (a part of it), `file:line:col`, and a part of its help.
pub type Expected<'a> = (&'a str, &'a str, &'a str);

/// [`expect_problem`] for each row of a table.
pub fn expect_problems(errs: &ManifestErrors, expected: &[Expected]) {
    for (message, at, help) in expected {
        expect_problem(errs, message, at, help);
    }
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
