//! [`Kind`]: a stage kind written against its own params struct, which is the one
//! declaration of its params. A blanket impl turns every `Kind` into the object-safe
//! [`StageKind`] the engine works with: the struct's schema becomes the spec's params
//! (see [`super::derive_params`]), and the engine's untyped param maps are deserialised into
//! the struct before each hook is called.

use std::any::TypeId;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{
    derive_params, DerivedParams, InputFiles, JudgeEstimate, KindSpec, ParamError, ParamSpec,
    Params, PlanInputs, PortSpec, Precision, StageKind,
};
use crate::artifact::ArtifactType;
use crate::context::StageContext;

/// What a kind says about itself besides its params: everything in [`KindSpec`] that a
/// struct cannot say. The fields mean what [`KindSpec`]'s fields of the same names mean
/// (bump `version` when a change can alter output bytes for the same params and inputs).
#[derive(Clone, Debug)]
pub struct KindInfo {
    pub name: &'static str,
    pub version: u32,
    pub summary: &'static str,
    pub inputs: Vec<PortSpec>,
    pub outputs: Vec<PortSpec>,
    pub precision: Precision,
}

impl KindInfo {
    /// A kind without ports yet, computing in [`Precision::STANDARD`]; add ports with
    /// [`KindInfo::inputs`] and [`KindInfo::outputs`].
    pub fn new(name: &'static str, version: u32, summary: &'static str) -> Self {
        KindInfo {
            name,
            version,
            summary,
            inputs: Vec::new(),
            outputs: Vec::new(),
            precision: Precision::STANDARD,
        }
    }

    pub fn inputs(self, inputs: Vec<PortSpec>) -> Self {
        KindInfo { inputs, ..self }
    }

    pub fn outputs(self, outputs: Vec<PortSpec>) -> Self {
        KindInfo { outputs, ..self }
    }

    /// Adds ports from a table, one port a line: direction, name, artifact type
    /// ([`ArtifactType::name`]), then the doc to the end of the line. The directions are `in`
    /// (required input), `in?` (optional), `in*` (a list: fan-in, optional) and `out`.
    ///
    /// ```text
    /// in   model      model     the model to evaluate
    /// in?  adapter    adapter   a LoRA adapter for `model`
    /// out  summary    summary   rates with 95% intervals, JSON
    /// ```
    ///
    /// A kind's ports are a table to read at a glance; as constructor calls they were ten
    /// lines of the same shape in every kind file. The table is the kind's own constant, so
    /// a malformed line is a bug in that kind: it panics, naming the line, the first time
    /// the kind is described (every registered kind is described by the tests).
    pub fn ports(mut self, table: &'static str) -> Self {
        for line in table.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut fields = line.split_whitespace();
            let (Some(dir), Some(name), Some(ty)) = (fields.next(), fields.next(), fields.next())
            else {
                panic!(
                    "kind `{}`: port line `{line}` needs a direction, a name and a type",
                    self.name
                );
            };
            let doc = port_doc(line);
            let ty = ArtifactType::from_name(ty).unwrap_or_else(|| {
                panic!(
                    "kind `{}`: port `{name}` has no artifact type `{ty}`",
                    self.name
                )
            });
            let port = match dir {
                "in" => PortSpec::input(name, ty, doc),
                "in?" => PortSpec::optional_input(name, ty, doc),
                "in*" => PortSpec::many_input(name, ty, doc),
                "out" => PortSpec::output(name, ty, doc),
                other => panic!(
                    "kind `{}`: port `{name}` has direction `{other}`; use in, in?, in* or out",
                    self.name
                ),
            };
            if dir == "out" {
                self.outputs.push(port);
            } else {
                self.inputs.push(port);
            }
        }
        self
    }

    /// For a kind that computes in another format than the standard one.
    pub fn precision(self, precision: Precision) -> Self {
        KindInfo { precision, ..self }
    }

    /// The whole [`KindSpec`]: this info with the kind's params, open or not. The blanket
    /// [`StageKind`] impl of a [`Kind`] passes the params derived from its struct; a kind
    /// written against [`StageKind`] directly (the engine's test and bench kinds) lists its
    /// own, so every spec is built here.
    pub fn into_spec(self, params: Vec<ParamSpec>, open_params: bool) -> KindSpec {
        KindSpec {
            name: self.name,
            version: self.version,
            summary: self.summary,
            params,
            open_params,
            inputs: self.inputs,
            outputs: self.outputs,
            precision: self.precision,
        }
    }
}

/// What follows the third word of a port line: its doc.
fn port_doc(line: &'static str) -> &'static str {
    let mut rest = line;
    for _ in 0..3 {
        rest = rest.trim_start();
        rest = rest.find(char::is_whitespace).map_or("", |i| &rest[i..]);
    }
    rest.trim()
}

/// A stage kind with typed params. `Params` is the single declaration of the kind's params:
/// field names, types, doc comments, `#[serde(default = ...)]` and `#[schemars(range(...))]`
/// become the names, types, docs, defaults and ranges the engine validates manifests against,
/// keys stages with and `emflow kinds` prints. A `#[serde(flatten)]` map of extra values
/// makes the params open (the `command` kind's template variables).
///
/// Every hook gets the params deserialised, defaults filled in; the contract of each is the
/// one of the [`StageKind`] method of the same name.
pub trait Kind: Send + Sync + 'static {
    type Params: DeserializeOwned + JsonSchema + 'static;

    /// Name, version, ports and precision. Cheap, no I/O, and the same for every instance.
    fn describe(&self) -> KindInfo;

    /// Checks beyond the declared types and ranges (combinations, formats), each located
    /// at its param.
    fn check(&self, params: &Self::Params) -> Result<(), Vec<ParamError>> {
        let _ = params;
        Ok(())
    }

    /// The outputs a stage with these params produces; by default the described ones.
    fn outputs(&self, params: &Self::Params) -> Vec<PortSpec> {
        let _ = params;
        self.describe().outputs
    }

    fn check_files(
        &self,
        params: &Self::Params,
        files: &InputFiles,
    ) -> Result<(), Vec<ParamError>> {
        let _ = (params, files);
        Ok(())
    }

    fn judge_estimate(
        &self,
        params: &Self::Params,
        inputs: &PlanInputs,
    ) -> anyhow::Result<Option<JudgeEstimate>> {
        let _ = (params, inputs);
        Ok(None)
    }

    /// See [`StageKind::memory_demand`].
    fn memory_demand(&self, params: &Self::Params) -> Option<crate::memory::MemoryDemand> {
        let _ = params;
        None
    }

    fn preview(
        &self,
        params: &Self::Params,
        inputs: &PlanInputs,
        dir: &Path,
    ) -> anyhow::Result<bool> {
        let _ = (params, inputs, dir);
        Ok(false)
    }

    fn runs_in_driver(&self) -> bool {
        false
    }

    /// Produce every declared output; see [`StageKind::run`] for the contract.
    fn run(&self, ctx: &mut StageContext, params: &Self::Params) -> anyhow::Result<()>;
}

/// The JSON Schema of a params type, as the engine reads it (draft 2020-12, the shape a
/// value must have to be deserialised).
pub fn schema_of<P: JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .for_deserialize()
        .into_generator();
    generator.into_root_schema_for::<P>().to_value()
}

/// The params derived from `P`, once per process: `spec()` is called per stage while a
/// manifest is planned, and generating a schema is far dearer than cloning its result.
pub fn derived_params<P: JsonSchema + 'static>() -> Arc<DerivedParams> {
    // One map for all params types (a static in a generic function is shared by every
    // instantiation), keyed by the type.
    static DERIVED: OnceLock<Mutex<HashMap<TypeId, Arc<DerivedParams>>>> = OnceLock::new();
    let cache = DERIVED.get_or_init(Default::default);
    let id = TypeId::of::<P>();
    if let Some(found) = cache.lock().ok().and_then(|map| map.get(&id).cloned()) {
        return found;
    }
    let derived = match derive_params(&schema_of::<P>()) {
        Ok(d) => Arc::new(d),
        // A programming error in a kind, found by any test that lists the kinds' specs.
        Err(e) => panic!("params type {}: {e}", std::any::type_name::<P>()),
    };
    if let Ok(mut map) = cache.lock() {
        map.insert(id, derived.clone());
    }
    derived
}

/// The engine's param map as the kind's struct. The engine has checked names, types and
/// ranges against the derived spec, so a failure here is in a nested value (a LoRA or judge
/// setting): the error names the kind and quotes serde's message, which names the field.
fn typed<K: Kind>(kind: &K, params: &Params) -> Result<K::Params, ParamError> {
    serde_json::from_value(Value::Object(params.clone())).map_err(|e| {
        // Only now: `describe` builds the port lists, too dear for every successful call.
        let name = kind.describe().name;
        ParamError {
            param: String::new(),
            message: format!("params do not fit kind `{name}`: {e}"),
            hint: Some(format!("`emflow kinds {name}` lists its params")),
        }
    })
}

impl<K: Kind> StageKind for K {
    fn spec(&self) -> KindSpec {
        let derived = derived_params::<K::Params>();
        self.describe()
            .into_spec(derived.params.clone(), derived.open)
    }

    fn outputs(&self, params: &Params) -> Vec<PortSpec> {
        match typed(self, params) {
            Ok(p) => Kind::outputs(self, &p),
            // Reported by `check`; until then the described outputs stand.
            Err(_) => self.describe().outputs,
        }
    }

    fn check(&self, params: &Params) -> Result<(), Vec<ParamError>> {
        let p = typed(self, params).map_err(|e| vec![e])?;
        Kind::check(self, &p)
    }

    fn runs_in_driver(&self) -> bool {
        Kind::runs_in_driver(self)
    }

    fn check_files(&self, params: &Params, files: &InputFiles) -> Result<(), Vec<ParamError>> {
        let p = typed(self, params).map_err(|e| vec![e])?;
        Kind::check_files(self, &p, files)
    }

    fn judge_estimate(
        &self,
        params: &Params,
        inputs: &PlanInputs,
    ) -> anyhow::Result<Option<JudgeEstimate>> {
        let p = typed(self, params).map_err(|e| anyhow::anyhow!(e.message))?;
        Kind::judge_estimate(self, &p, inputs)
    }

    fn memory_demand(&self, params: &Params) -> Option<crate::memory::MemoryDemand> {
        // Params that do not deserialise were refused at validation; nothing to estimate.
        Kind::memory_demand(self, &typed(self, params).ok()?)
    }

    fn preview(&self, params: &Params, inputs: &PlanInputs, dir: &Path) -> anyhow::Result<bool> {
        let p = typed(self, params).map_err(|e| anyhow::anyhow!(e.message))?;
        Kind::preview(self, &p, inputs, dir)
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let p: K::Params = ctx.params_as()?;
        Kind::run(self, ctx, &p)
    }
}
