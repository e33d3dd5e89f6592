//! Keeping a loaded manifest's texts reachable for diagnostics raised after loading.
//!
//! [`crate::pipeline::Pipeline`] is a plain serialisable value shared with the back end, so
//! it carries spans but not the texts they point into. The texts (and each stage's located
//! YAML, to find a param's line from a dotted path) are kept here, registered per manifest
//! path when [`super::load_pipeline`] succeeds; a later load of the same path replaces them.
//! A pipeline that was never loaded here (built by hand, or deserialised) falls back to
//! reading its manifest file, and to a diagnostic without a snippet when that fails too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::diagnostics::report_at;
use crate::manifest::source::SourceMap;
use crate::manifest::yaml::{Node, Value};
use crate::pipeline::{Pipeline, SourceSpan};

/// A loaded manifest's texts and located stage entries.
#[derive(Debug)]
pub struct LoadedSources {
    pub map: Arc<SourceMap>,
    /// Stage name -> (span of its name, its mapping after profile and `--set`).
    stages: HashMap<String, (SourceSpan, Node)>,
}

impl LoadedSources {
    pub fn new(map: Arc<SourceMap>, stages: HashMap<String, (SourceSpan, Node)>) -> Self {
        LoadedSources { map, stages }
    }

    /// Where `path` (dotted, relative to the stage's entry: `params.ops.2.take`,
    /// `inputs.data`, `resources.memory`) is written for stage instance `stage_id` (or a stage
    /// name). A path only partly written (a default, or a value behind a `${...}`) gives its
    /// deepest written part; an empty path gives the stage's name.
    pub fn span_of(&self, pipeline: &Pipeline, stage_id: &str, path: &str) -> Option<SourceSpan> {
        let stage = pipeline
            .stages
            .iter()
            .find(|s| s.id == stage_id)
            .map_or(stage_id, |s| s.stage.as_str());
        let (name_span, entry) = self.stages.get(stage)?;
        if path.is_empty() {
            return Some(*name_span);
        }
        let (found, _) = entry.walk(path);
        if std::ptr::eq(found, entry) {
            return Some(*name_span);
        }
        // For a mapping that was reached, its key reads better than the whole block.
        if let Value::Map(_) | Value::Seq(_) = found.value {
            if let Some(key_span) = key_span_of(entry, path) {
                return Some(key_span);
            }
        }
        Some(found.span)
    }

    /// A located diagnostic against these texts.
    pub fn diagnostic(
        &self,
        span: SourceSpan,
        message: &str,
        label: &str,
        help: Option<&str>,
    ) -> miette::Report {
        report_at(
            Some(&self.map),
            span,
            message,
            label,
            help.map(str::to_string),
        )
    }
}

/// The span of the key under which the deepest reachable node of `path` sits.
fn key_span_of(entry: &Node, path: &str) -> Option<SourceSpan> {
    let mut node = entry;
    let mut span = None;
    for part in path.split('.') {
        let next = match &node.value {
            Value::Map(m) => m.entry(part).map(|e| (e.key_span, &e.value)),
            Value::Seq(items) => part
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get(i))
                .map(|n| (n.span, n)),
            _ => None,
        };
        let Some((at, child)) = next else { break };
        span = Some(at);
        node = child;
    }
    span
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<LoadedSources>>> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<LoadedSources>>>> = OnceLock::new();
    LOADED.get_or_init(|| Mutex::new(HashMap::new()))
}

pub fn register(manifest_path: &Path, sources: Arc<LoadedSources>) {
    if let Ok(mut map) = registry().lock() {
        map.insert(manifest_path.to_path_buf(), sources);
    }
}

/// The texts of the manifest `pipeline` was loaded from, if this process loaded it.
pub fn sources_for(pipeline: &Pipeline) -> Option<Arc<LoadedSources>> {
    registry()
        .lock()
        .ok()?
        .get(&pipeline.manifest_path)
        .cloned()
}

/// Where `path` (relative to the stage's entry: `params.ops.2.take`, `inputs.data`) is written
/// for stage instance `stage_id`. `None` when the pipeline was not loaded by this process.
pub fn span_of(pipeline: &Pipeline, stage_id: &str, path: &str) -> Option<SourceSpan> {
    sources_for(pipeline)?.span_of(pipeline, stage_id, path)
}

/// For errors found later (cycle in the DAG, a kind's ParamError): build a diagnostic at a span.
pub fn diagnostic_at(
    pipeline: &Pipeline,
    span: SourceSpan,
    message: impl Into<String>,
    label: impl Into<String>,
    help: Option<String>,
) -> miette::Report {
    if let Some(s) = sources_for(pipeline) {
        return report_at(Some(&s.map), span, message, label, help);
    }
    match std::fs::read_to_string(&pipeline.manifest_path) {
        Ok(text) => {
            let map = SourceMap::new(pipeline.manifest_path.display().to_string(), text);
            report_at(Some(&map), span, message, label, help)
        }
        Err(_) => report_at(None, span, message, label, help),
    }
}
