//! The stage-kind contract: what a kind declares, and what the engine promises it.
//!
//! A stage kind is a pure function from (params, input artifacts) to output artifacts,
//! run by the engine inside a private staging folder. The engine owns everything around
//! that call: keying, locking, caching, committing, retrying, progress display. That split
//! is what lets one kind run unchanged in-process, in an `emflow exec-stage` subprocess, or
//! as a Slurm job: a kind never sees the store, only the [`StageContext`] handed to it.
//!
//! A kind is written against [`Kind`] (in `kind/typed.rs`): a params struct, deserialised
//! by serde, is the one declaration of its params. Its JSON Schema (schemars) gives the
//! [`ParamSpec`]s: names, types, defaults, docs and ranges (`kind/schema.rs`,
//! [`derive_params`]). A blanket impl makes every `Kind` a [`StageKind`], the object-safe
//! trait the engine stores in the [`Registry`] and calls; a hand-written `StageKind` (the
//! engine's tests do this) declares its `ParamSpec`s itself.
//!
//! The declaration ([`KindSpec`]) is used *before* anything runs: validation checks a
//! manifest's params (unknown names, types, ranges) and wiring against it with line/column
//! diagnostics, defaults are filled in from it, and the planner folds `name`, `version`, the
//! canonical params and the declared [`Precision`] into every stage key. So bump
//! [`KindSpec::version`] whenever a change to [`StageKind::run`] can change output bytes for
//! the same params and inputs; that invalidates exactly that kind's cached results and
//! nothing else.

mod listing;
mod schema;
mod typed;

pub use listing::kinds_text;
pub use schema::{derive_params, DerivedParams, CONNECTION_FIELDS};
pub use typed::{derived_params, schema_of, Kind, KindInfo};

use std::collections::BTreeMap;

use serde_json::Value;

pub use crate::artifact::{ArtifactType, Params};
use crate::context::StageContext;

/// The type a param must have. Checked at validation time, with the manifest location.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamType {
    Bool,
    Int,
    /// Accepts integers too: `1` and `1.0` are the same value, and key the same (unless the
    /// param is nullable, see [`ParamSpec::keys_as_float`]).
    Float,
    String,
    /// One of the listed strings.
    Enum(Vec<String>),
    List,
    Map,
    /// Anything; the kind checks it in [`StageKind::check`].
    Any,
}

impl ParamType {
    /// The type as a noun phrase for messages: "an integer", "one of `a`, `b`".
    pub fn describe(&self) -> String {
        match self {
            ParamType::Bool => "a boolean".into(),
            ParamType::Int => "an integer".into(),
            ParamType::Float => "a number".into(),
            ParamType::String => "a string".into(),
            ParamType::Enum(options) => {
                format!(
                    "one of {}",
                    crate::diagnostics::list_names(options.iter().map(String::as_str))
                )
            }
            ParamType::List => "a list".into(),
            ParamType::Map => "a mapping".into(),
            ParamType::Any => "any value".into(),
        }
    }

    /// The type as one word for tables (`emflow kinds`).
    pub fn short_name(&self) -> &'static str {
        match self {
            ParamType::Bool => "bool",
            ParamType::Int => "int",
            ParamType::Float => "float",
            ParamType::String => "string",
            ParamType::Enum(_) => "enum",
            ParamType::List => "list",
            ParamType::Map => "map",
            ParamType::Any => "any",
        }
    }
}

/// One end of a [`Range`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    pub value: f64,
    /// Whether `value` itself is outside the range (`> 0` rather than `>= 0`).
    pub exclusive: bool,
}

/// The values a number param may take. Checked at validation time, at the value's place.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Range {
    pub min: Option<Bound>,
    pub max: Option<Bound>,
}

impl Range {
    /// Whether `v` lies in the range.
    pub fn contains(&self, v: f64) -> bool {
        let above = self
            .min
            .is_none_or(|b| v > b.value || (!b.exclusive && v == b.value));
        let below = self
            .max
            .is_none_or(|b| v < b.value || (!b.exclusive && v == b.value));
        above && below
    }

    pub fn is_unbounded(&self) -> bool {
        self.min.is_none() && self.max.is_none()
    }

    /// The range after "must be": `>= 1`, `in [0, 1]`.
    pub fn phrase(&self) -> String {
        if self.min.is_some() && self.max.is_some() {
            format!("in {self}")
        } else {
            self.to_string()
        }
    }
}

/// `>= 1`, `> 0`, `<= 1`, `[0, 100]`, `(0, 1]`; empty when unbounded.
impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Rust prints `1.0_f64` as `1`: a bound on an integer param reads as one.
        let num = |v: f64| format!("{v}");
        match (self.min, self.max) {
            (None, None) => Ok(()),
            (Some(lo), None) => write!(
                f,
                "{} {}",
                if lo.exclusive { ">" } else { ">=" },
                num(lo.value)
            ),
            (None, Some(hi)) => write!(
                f,
                "{} {}",
                if hi.exclusive { "<" } else { "<=" },
                num(hi.value)
            ),
            (Some(lo), Some(hi)) => write!(
                f,
                "{}{}, {}{}",
                if lo.exclusive { "(" } else { "[" },
                num(lo.value),
                num(hi.value),
                if hi.exclusive { ")" } else { "]" }
            ),
        }
    }
}

/// One declared param of a kind. Typed kinds ([`Kind`]) never write these: they are
/// derived from the kind's params struct (see [`derive_params`]).
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub ty: ParamType,
    /// Whether `null` is a value of this param (an `Option` field).
    pub nullable: bool,
    /// For `Int` and `Float`: the values allowed.
    pub range: Range,
    /// Filled in when the manifest omits the param, *before* keying: writing a default
    /// explicitly and omitting it give the same stage key. `None` means required.
    pub default: Option<Value>,
    /// For `emflow kinds` and for diagnostics' hints: the field's doc comment.
    pub doc: String,
    /// Fields of this (map) param that are connection settings, not results: left out of
    /// the stage key, so that moving a judge server to another port or raising its timeout
    /// leaves every stage cached. Declared by the param's type with [`CONNECTION_FIELDS`].
    pub connection_fields: Vec<String>,
    /// The same for each entry of a map param whose values are such a type (`eval`'s
    /// `judges`: metric -> judge): fields left out of every entry in the stage key.
    pub entry_connection_fields: Vec<String>,
    /// The param enters the stage key only when it differs from its default. For params
    /// added to a kind after its results were cached, whose default reproduces the old
    /// behaviour exactly: existing keys stay valid. Declared on a field with
    /// `#[schemars(extend("x-emflow-key-omits-default" = true))]`.
    pub key_omits_default: bool,
}

impl ParamSpec {
    pub fn required(name: impl Into<String>, ty: ParamType, doc: impl Into<String>) -> Self {
        ParamSpec {
            name: name.into(),
            ty,
            nullable: false,
            range: Range::default(),
            default: None,
            doc: doc.into(),
            connection_fields: Vec::new(),
            entry_connection_fields: Vec::new(),
            key_omits_default: false,
        }
    }
    pub fn optional(
        name: impl Into<String>,
        ty: ParamType,
        default: Value,
        doc: impl Into<String>,
    ) -> Self {
        ParamSpec {
            default: Some(default),
            ..ParamSpec::required(name, ty, doc)
        }
    }

    /// Whether an integer written for this param is keyed (and handed to the kind) as a
    /// float, so that `1` and `1.0` give one key. Only non-nullable `Float` params: every
    /// nullable number (`Option<f64>`) was declared `Any` before params were derived from
    /// the kinds' structs, and keyed as written; folding its integers now would change the
    /// keys of results already in users' stores.
    pub fn keys_as_float(&self) -> bool {
        self.ty == ParamType::Float && !self.nullable
    }

    /// Whether `value` is left out of the stage key (see [`ParamSpec::key_omits_default`]).
    pub fn unkeyed(&self, value: &Value) -> bool {
        self.key_omits_default && self.default.as_ref() == Some(value)
    }

    /// The doc's first line, for one-line listings.
    pub fn summary(&self) -> &str {
        self.doc.lines().next().unwrap_or("")
    }
}

/// One declared input or output port.
#[derive(Clone, Debug)]
pub struct PortSpec {
    pub name: String,
    pub ty: ArtifactType,
    /// Inputs only: the manifest must wire this port.
    pub required: bool,
    /// Inputs only: the port takes a list of artifacts (fan-in), e.g. a report's summaries.
    pub many: bool,
    pub doc: &'static str,
}

impl PortSpec {
    /// A port that must be wired and takes one artifact; see [`PortSpec::output`].
    pub fn input(name: &str, ty: ArtifactType, doc: &'static str) -> Self {
        PortSpec {
            name: name.to_string(),
            ty,
            required: true,
            many: false,
            doc,
        }
    }
    pub fn optional_input(name: &str, ty: ArtifactType, doc: &'static str) -> Self {
        PortSpec {
            required: false,
            ..PortSpec::input(name, ty, doc)
        }
    }
    pub fn many_input(name: &str, ty: ArtifactType, doc: &'static str) -> Self {
        PortSpec {
            required: false,
            many: true,
            ..PortSpec::input(name, ty, doc)
        }
    }
    /// An output: one artifact, always produced (`required` and `many` mean nothing for an
    /// output; it carries the values of a plain input).
    pub fn output(name: &str, ty: ArtifactType, doc: &'static str) -> Self {
        PortSpec::input(name, ty, doc)
    }
}

/// Everything a kind declares about itself. Built once per process.
#[derive(Clone, Debug)]
pub struct KindSpec {
    /// The `kind:` value in a manifest.
    pub name: &'static str,
    /// Implementation version, folded into every stage key of this kind.
    pub version: u32,
    /// One line for `emflow kinds` and `--help`.
    pub summary: &'static str,
    pub params: Vec<ParamSpec>,
    /// When true, params not listed in `params` are accepted as they are (the `command`
    /// kind takes arbitrary template variables); otherwise an unknown param is an error
    /// with a "did you mean" hint.
    pub open_params: bool,
    pub inputs: Vec<PortSpec>,
    pub outputs: Vec<PortSpec>,
    /// The number format the kind computes in on each device class; part of every key.
    pub precision: Precision,
}

/// A number format a kind computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// Bytes a number takes in this format.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// The number format a kind computes in on each device class. Declared by the kind and
/// folded into every stage key (`keys::EnvParts`), so results computed in another precision
/// are never mistaken for each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    pub cpu: Dtype,
    pub cuda: Dtype,
}

impl Precision {
    /// f32 on CPU, bf16 on CUDA: what the model layer computes in, and what every key said
    /// before kinds declared their precision (so choosing it changes no key).
    pub const STANDARD: Precision = Precision {
        cpu: Dtype::F32,
        cuda: Dtype::Bf16,
    };

    /// The device class and format of a stage given `gpus` GPUs.
    pub fn on(self, gpus: u32) -> (&'static str, Dtype) {
        if gpus > 0 {
            ("cuda", self.cuda)
        } else {
            ("cpu", self.cpu)
        }
    }
}

impl Default for Precision {
    fn default() -> Self {
        Precision::STANDARD
    }
}

impl KindSpec {
    /// The declared type of input `port`; `File` for a port the kind does not declare.
    pub fn input_type(&self, port: &str) -> ArtifactType {
        self.inputs
            .iter()
            .find(|p| p.name == port)
            .map(|p| p.ty)
            .unwrap_or(ArtifactType::File)
    }
}

/// A stage's wired input ports, each with its references in order: `Some(path)` (absolute)
/// for a `file:` input, `None` for a model or another stage's output.
pub type InputFiles = BTreeMap<String, Vec<Option<std::path::PathBuf>>>;

/// A problem a kind found in its params; `param` is a dotted path below the stage's
/// `params:` (e.g. `ops.2.take`) that the engine turns into a manifest line and column.
#[derive(Clone, Debug)]
pub struct ParamError {
    pub param: String,
    pub message: String,
    pub hint: Option<String>,
}

/// What one wired input is known to be while planning, before anything runs: handed to
/// [`StageKind::judge_estimate`] and [`StageKind::preview`].
#[derive(Clone, Debug)]
pub struct PlanInput {
    /// `file:PATH`, `stage[axis=value].output` or `models.NAME`.
    pub origin: String,
    pub ty: ArtifactType,
    /// The bytes, when they exist now: a `file:` input, an upstream's cached output, a local
    /// model, or a plan-time preview of an upstream (see [`PlanInput::preview`]). The digest
    /// is empty: planning never hashes for estimates.
    pub artifact: Option<crate::artifact::Artifact>,
    /// Set when `artifact` is a plan-time preview written by the upstream's kind (exact
    /// bytes the upstream would write, not stored anywhere).
    pub preview: bool,
    /// For a model input: its `models:` source (`hf:org/name@rev`, a path, ...).
    pub model_source: Option<String>,
    /// When `artifact` is `None`: the stage or model that must run or be fetched first.
    pub waits_on: Option<String>,
    /// When `artifact` is `None` because stage `waits_on` must run first: that stage's
    /// params (defaults filled), so a reader can bound what it will write before it exists
    /// (e.g. how many snapshots a training stage's `snapshot_fractions` ask for).
    pub upstream_params: Option<crate::artifact::Params>,
}

/// A stage's inputs while planning: port name -> wired inputs (several for many-ports).
#[derive(Clone, Debug, Default)]
pub struct PlanInputs {
    pub ports: BTreeMap<String, Vec<PlanInput>>,
}

impl PlanInputs {
    /// The first input wired to `port`, if any.
    pub fn first(&self, port: &str) -> Option<&PlanInput> {
        self.ports.get(port).and_then(|v| v.first())
    }

    /// The bytes wired to `port` when they are known now; `Err` says what they wait on, as
    /// a phrase for an estimate's notes ("unknown until rl_prompts runs").
    pub fn known(&self, port: &str) -> Result<&crate::artifact::Artifact, String> {
        match self.first(port) {
            None => Err(format!("input `{port}` is not wired")),
            Some(PlanInput {
                artifact: Some(a), ..
            }) => Ok(a),
            Some(input) => Err(match &input.waits_on {
                Some(up) => format!("unknown until {up} runs"),
                None => format!("{} is not available", input.origin),
            }),
        }
    }
}

/// The judge calls one stage will make, as its kind estimates them before it runs. The
/// engine prices them and sums them (see `emflow plan`); kinds only count.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct JudgeEstimate {
    /// The judge model's name as a price table names it: the API's model (`gpt-4.1-mini`),
    /// or the file name of a local judge's weights.
    pub judge_model: String,
    /// A judge run in-process: it costs time, not an API bill (unless a price is set).
    pub local: bool,
    /// Calls the stage makes; `None` when they cannot be counted yet (see `notes`).
    pub calls: Option<u64>,
    /// Whether `calls` (and the tokens) is an upper bound rather than the exact count.
    pub upper_bound: bool,
    /// Estimated prompt tokens over all calls (characters / 4 plus answer lengths at their
    /// token limits).
    pub prompt_tokens: u64,
    /// Completion tokens over all calls, at the judge's token limit per call.
    pub completion_tokens: u64,
    /// How the numbers were reached, or why they are unknown; shown under the stage.
    pub notes: Vec<String>,
}

impl JudgeEstimate {
    /// An estimate whose call count is not known before `why` (e.g. "unknown until
    /// rl_prompts runs").
    pub fn unknown(judge_model: String, local: bool, why: String) -> Self {
        JudgeEstimate {
            judge_model,
            local,
            calls: None,
            upper_bound: false,
            prompt_tokens: 0,
            completion_tokens: 0,
            notes: vec![why],
        }
    }
}

/// Tokens in `chars` characters of text by the usual rule of thumb (4 characters a token):
/// what judge-cost estimates use where no tokenizer is at hand.
pub fn estimated_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

/// A stage kind. Implementations are stateless and shared across threads; all per-run state
/// lives in the [`StageContext`].
pub trait StageKind: Send + Sync + 'static {
    /// The static declaration. Called during validation and planning, possibly many times:
    /// keep it cheap and free of I/O.
    fn spec(&self) -> KindSpec;

    /// The outputs a stage with these params produces. Defaults to the spec's outputs; the
    /// `command` kind overrides it because its outputs are named in the manifest.
    /// Called at plan time, after defaults are filled in.
    fn outputs(&self, params: &Params) -> Vec<PortSpec> {
        let _ = params;
        self.spec().outputs
    }

    /// Checks beyond the declared param types and ranges (combinations, formats). Called at
    /// validation time with defaults filled in; an `Err` stops the run before anything
    /// executes and each error is shown at its param's location.
    fn check(&self, params: &Params) -> Result<(), Vec<ParamError>> {
        let _ = params;
        Ok(())
    }

    /// Whether the default `local` executor may run this kind on a thread of the driver
    /// instead of in an `exec-stage` child process of its own. Say yes only for a kind whose
    /// real work already runs in child processes (`command`) or that cannot crash, leak or
    /// need its own peak-memory figure: for such a kind the ~10 ms a process start costs
    /// buys nothing, and sweeps of thousands of small stages pay it on every fresh run.
    /// A job given GPUs always gets a child process (its `CUDA_VISIBLE_DEVICES` is its own).
    fn runs_in_driver(&self) -> bool {
        false
    }

    /// Checks that need the stage's input files, for the inputs known at plan time: those
    /// wired with `file:` (files made by other stages do not exist yet). `files` holds each
    /// wired input port's references in order: `Some(path)` for a `file:` input, `None` for
    /// any other. Called while the manifest is expanded, once per matrix cell with `file:`
    /// inputs, after [`StageKind::check`] passed; errors are located like `check`'s.
    ///
    /// Keep it cheap (it runs on every plan, `--dry-run` and `emflow check` included): look
    /// at small files only, and skip missing or unreadable ones, which the run reports.
    fn check_files(&self, params: &Params, files: &InputFiles) -> Result<(), Vec<ParamError>> {
        let _ = (params, files);
        Ok(())
    }

    /// The judge calls a stage with these params and inputs will make, for `emflow plan`'s
    /// cost table and the `--max-judge-calls`/`--max-judge-cost` guard of `emflow run`.
    /// `None` (the default) means the kind calls no judge. Called at plan time: read only
    /// small inputs whose bytes are known ([`PlanInputs::known`]); when a count depends on
    /// an input that does not exist yet, return [`JudgeEstimate::unknown`] saying what it
    /// waits on. Never run a model here.
    fn judge_estimate(
        &self,
        params: &Params,
        inputs: &PlanInputs,
    ) -> anyhow::Result<Option<JudgeEstimate>> {
        let _ = (params, inputs);
        Ok(None)
    }

    /// What a stage with these params holds on a GPU (trained weights, micro-batch, sampled
    /// sequences), for the plan's memory estimate and its refusal of plans that cannot fit
    /// (`crate::memory`). `None` (the default): the kind puts no model on a GPU. Called at plan
    /// time from params alone; the engine supplies the model's shape.
    fn memory_demand(&self, params: &Params) -> Option<crate::memory::MemoryDemand> {
        let _ = params;
        None
    }

    /// Writes the outputs this stage would produce, as `dir/<output name>`, when they are a
    /// cheap function of inputs known at plan time (the `dataset` kind: a few file reads and
    /// row ops); returns whether it did. Planning uses previews so that a downstream
    /// [`StageKind::judge_estimate`] can count rows of a stage that has not run yet. The
    /// bytes must be exactly what [`StageKind::run`] would write; they are never stored.
    /// The default writes nothing.
    fn preview(
        &self,
        params: &Params,
        inputs: &PlanInputs,
        dir: &std::path::Path,
    ) -> anyhow::Result<bool> {
        let _ = (params, inputs, dir);
        Ok(false)
    }

    /// Produce every declared output under [`StageContext::output_path`].
    ///
    /// Contract:
    /// - Called only on a cache miss, with a fresh, empty staging folder, at most once at a
    ///   time per stage key across all processes sharing the store.
    /// - `Ok(())` means every declared output exists; the engine then hashes and commits
    ///   them. A missing output turns the run into a failure.
    /// - `Err(e)` discards the staging folder; nothing becomes visible in the store. Give
    ///   errors a cause a user can act on (`anyhow::Context`).
    /// - Return [`crate::context::Interrupted`] (via [`StageContext::check_interrupt`]) after
    ///   saving a checkpoint to ask to be re-run later; the next run finds the checkpoint in
    ///   [`StageContext::checkpoint_dir`].
    /// - Outputs must depend only on params and input bytes (and the device class): never on
    ///   thread counts, batch sizes chosen for speed, wall-clock time or paths. `emflow verify`
    ///   re-runs stages and reports any that break this.
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()>;
}

/// Fetches models named by a scheme the engine does not handle itself (`pip:`, `hf:`).
/// Local paths are handled by the engine (hashed in place, never copied).
pub trait ModelFetcher: Send + Sync + 'static {
    /// The schemes handled, e.g. `["pip", "hf"]`.
    fn schemes(&self) -> &'static [&'static str];

    /// Materialise `source` (the full string, scheme included) as a file or directory at
    /// `dest`, which does not exist yet. Called once per source per store: the engine commits
    /// what is written to the store and reuses it afterwards. Errors must say how to get the
    /// model by other means (e.g. point the manifest at a local copy).
    fn fetch(
        &self,
        source: &str,
        dest: &std::path::Path,
        progress: &dyn crate::context::Progress,
    ) -> anyhow::Result<()>;
}

/// The kinds and fetchers one `emflow` binary knows, and the tools it offers besides them.
/// Built by the binary (from the stages crate) and handed to the CLI; the engine itself
/// knows no kind by name.
#[derive(Default, Clone)]
pub struct Registry {
    /// Stage kinds by their spec name.
    kinds: BTreeMap<&'static str, std::sync::Arc<dyn StageKind>>,
    /// Model fetchers, asked in order for a `scheme:` they handle.
    fetchers: Vec<std::sync::Arc<dyn ModelFetcher>>,
    /// Benchmarks: `emflow bench NAME [ARGS...]`.
    benches: BTreeMap<&'static str, Tool>,
    /// Top-level commands implemented outside the engine: `emflow NAME [ARGS...]`.
    commands: BTreeMap<&'static str, Tool>,
}

/// What a tool runs: called with the arguments after its name.
pub type CommandFn = std::sync::Arc<dyn Fn(&[String]) -> anyhow::Result<()> + Send + Sync>;

/// A function a [`Tool`] can run.
pub trait ToolFn: Fn(&[String]) -> anyhow::Result<()> + Send + Sync + 'static {}
impl<F: Fn(&[String]) -> anyhow::Result<()> + Send + Sync + 'static> ToolFn for F {}

/// A named program the binary offers besides stage kinds: a benchmark (it prints its own
/// figures) or an extra top-level command such as `serve`.
#[derive(Clone)]
pub struct Tool {
    pub summary: &'static str,
    /// Called with the arguments after the name.
    pub run: CommandFn,
}

impl Tool {
    fn new(summary: &'static str, run: impl ToolFn) -> Self {
        Tool {
            summary,
            run: std::sync::Arc::new(run),
        }
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a kind under its spec name; a second kind of the same name replaces the first.
    pub fn with_kind(mut self, kind: impl StageKind) -> Self {
        let name = kind.spec().name;
        self.kinds.insert(name, std::sync::Arc::new(kind));
        self
    }

    pub fn with_fetcher(mut self, fetcher: impl ModelFetcher) -> Self {
        self.fetchers.push(std::sync::Arc::new(fetcher));
        self
    }

    /// Adds a benchmark run by `emflow bench NAME [ARGS...]`.
    pub fn with_bench(
        mut self,
        name: &'static str,
        summary: &'static str,
        run: impl ToolFn,
    ) -> Self {
        self.benches.insert(name, Tool::new(summary, run));
        self
    }

    /// Adds a top-level command implemented outside the engine (e.g. `serve`, which needs
    /// the model layer): the CLI passes it the arguments after its name.
    pub fn with_command(
        mut self,
        name: &'static str,
        summary: &'static str,
        run: impl ToolFn,
    ) -> Self {
        self.commands.insert(name, Tool::new(summary, run));
        self
    }

    pub fn command(&self, name: &str) -> Option<&Tool> {
        self.commands.get(name)
    }

    pub fn bench(&self, name: &str) -> Option<&Tool> {
        self.benches.get(name)
    }

    pub fn benches(&self) -> impl Iterator<Item = (&'static str, &Tool)> + '_ {
        self.benches.iter().map(|(k, v)| (*k, v))
    }

    pub fn kind(&self, name: &str) -> Option<&std::sync::Arc<dyn StageKind>> {
        self.kinds.get(name)
    }

    pub fn kind_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    pub fn fetcher(&self, scheme: &str) -> Option<&std::sync::Arc<dyn ModelFetcher>> {
        self.fetchers.iter().find(|f| f.schemes().contains(&scheme))
    }
}
