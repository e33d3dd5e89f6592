//! The expanded pipeline: what the manifest front end (parse, profiles, `--set`, references,
//! matrices, validation) hands to the back end (DAG, keys, scheduling, execution).
//!
//! Everything here is fully resolved: no `${...}` references, no profiles, no matrix syntax.
//! One [`StageInstance`] per matrix cell; cells that are identical (same kind, params and
//! inputs) have already been merged by the front end so that they run once.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::kind::{ArtifactType, Params};

/// A byte range in the manifest source, for diagnostics raised after expansion
/// (e.g. a cycle found by the DAG builder, or a kind's [`crate::kind::ParamError`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceSpan {
    pub offset: usize,
    pub len: usize,
}

/// Where a named model comes from, as written in `models:`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelDecl {
    pub name: String,
    /// `path/to/file.gguf`, `path/to/hf-dir`, `pip:NAME==VERSION#member/path`,
    /// or `hf:org/name@revision`. Relative paths are resolved against the manifest folder.
    pub source: String,
    pub span: SourceSpan,
    /// `shape:` as written (a built-in name or config.json's numbers), for the memory
    /// estimate when the model's own config.json is not at hand (`crate::memory`). Never
    /// part of a key: the model enters keys by its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<serde_json::Value>,
}

/// What one input port is wired to.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum InputRef {
    /// Output `output` of stage instance `stage` (an instance id such as `grpo[seed=1]`).
    Stage { stage: String, output: String },
    /// A model from `models:`.
    Model { name: String },
    /// A local file or folder, absolute after expansion; keyed by content.
    File { path: PathBuf },
}

/// Declared resource needs; used by the scheduler and by cluster executors.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub gpus: u32,
    /// Bytes; 0 = unspecified.
    pub memory: u64,
    /// Seconds; 0 = unspecified (cluster executors use their profile's default).
    pub time_limit: u64,
    /// Bytes of memory on each GPU the stage gets; 0 = unspecified (a run then asks the
    /// driver). What the plan's memory estimate is checked against (`crate::memory`).
    #[serde(default)]
    pub gpu_memory: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: 1,
            gpus: 0,
            memory: 0,
            time_limit: 0,
            gpu_memory: 0,
        }
    }
}

/// One runnable stage: a manifest stage, or one cell of a matrix stage.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StageInstance {
    /// `name` for a plain stage; `name[axis=value,...]` (axes sorted) for a matrix cell.
    pub id: String,
    /// The manifest stage it came from.
    pub stage: String,
    /// Matrix coordinates of this cell (empty for a plain stage).
    /// A sorted list, not a map: a map's first node takes ~1 KiB, which at 100,000 cells was
    /// a fifth of a dry run's memory (issue 22).
    pub matrix: Vec<(String, serde_json::Value)>,
    pub kind: String,
    /// Resolved params, kind defaults filled in.
    pub params: Params,
    /// Port name -> wired artifacts (one for ordinary ports, several for many-ports).
    pub inputs: BTreeMap<String, Vec<InputRef>>,
    /// Output name -> type, from the kind (possibly depending on params).
    pub outputs: BTreeMap<String, ArtifactType>,
    pub resources: Resources,
    /// Span of the stage's entry in the manifest.
    pub span: SourceSpan,
}

/// The whole expanded manifest.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Pipeline {
    pub name: String,
    /// The manifest file, and the folder relative paths were resolved against.
    pub manifest_path: PathBuf,
    pub manifest_dir: PathBuf,
    /// The profile applied, if any.
    pub profile: Option<String>,
    pub models: BTreeMap<String, ModelDecl>,
    /// Instances in a deterministic order (manifest order, then matrix expansion order).
    pub stages: Vec<StageInstance>,
}
