//! Input wiring as written: `<stage>.<output>`, `<stage>[axis=value,...].<output>`,
//! `models.<name>`, `file:<path>`, or a list of these for a many-port.
//!
//! Parsing is separate from resolution (see [`super::wiring`]) because the stage-level
//! dependency order must be known before any stage's upstream cells can be matched.

use crate::diagnostics::{list_names, Problem};
use crate::kind::KindSpec;
use crate::manifest::raw::is_valid_name;
use crate::manifest::yaml::{resolve_plain, Node, Value};
use crate::pipeline::SourceSpan;

/// One reference in an `inputs:` entry.
#[derive(Clone, Debug)]
pub enum InputSpec {
    Stage {
        stage: String,
        select: Vec<(String, Node)>,
        output: String,
    },
    Model {
        name: String,
    },
    File {
        path: String,
    },
}

/// One wired port of one cell: the references in the order written, each with its location.
#[derive(Clone, Debug)]
pub struct PortWiring {
    pub port: String,
    pub refs: Vec<(InputSpec, SourceSpan)>,
}

/// Parses one reference string.
pub fn parse_ref(s: &str, span: SourceSpan) -> Result<InputSpec, String> {
    if let Some(path) = s.strip_prefix("file:") {
        if path.trim().is_empty() {
            return Err("`file:` needs a path, e.g. `file:data/train.jsonl`".into());
        }
        return Ok(InputSpec::File {
            path: path.to_string(),
        });
    }
    if let Some(name) = s.strip_prefix("models.") {
        if !is_valid_name(name) {
            return Err(format!(
                "`{s}` does not name a model: write `models.<name>`"
            ));
        }
        return Ok(InputSpec::Model {
            name: name.to_string(),
        });
    }
    let (head, output) = s.rsplit_once('.').ok_or_else(|| {
        format!("`{s}` is not an input reference: write `<stage>.<output>`, `models.<name>` or `file:<path>`")
    })?;
    let (stage, select) = match head.split_once('[') {
        None => (head, Vec::new()),
        Some((stage, rest)) => {
            let inner = rest
                .strip_suffix(']')
                .ok_or_else(|| format!("`{s}`: a cell selection `[...]` must be closed by `]`"))?;
            let mut select = Vec::new();
            for part in inner.split(',') {
                let (axis, value) = part.split_once('=').ok_or_else(|| {
                    format!("`{s}`: cell selections look like `[axis=value,...]`")
                })?;
                let axis = axis.trim();
                if !is_valid_name(axis) {
                    return Err(format!("`{s}`: `{axis}` is not an axis name"));
                }
                select.push((
                    axis.to_string(),
                    Node::new(span, resolve_plain(value.trim())),
                ));
            }
            (stage, select)
        }
    };
    if !is_valid_name(stage) || !is_valid_name(output) {
        return Err(format!(
            "`{s}` is not an input reference: write `<stage>.<output>`, `<stage>[axis=value].<output>`, `models.<name>` or `file:<path>`"
        ));
    }
    Ok(InputSpec::Stage {
        stage: stage.to_string(),
        select,
        output: output.to_string(),
    })
}

/// `key`, written under a stage's `inputs:`, is not an input port of its kind.
fn unknown_port(stage: &str, spec: &KindSpec, key: &str, at: SourceSpan) -> Problem {
    let ports = || spec.inputs.iter().map(|p| p.name.as_str());
    let listed = || {
        format!(
            "kind `{}` has input ports {}",
            spec.name,
            list_names(ports())
        )
    };
    let message = format!(
        "stage `{stage}`: kind `{}` has no input port `{key}`",
        spec.name
    );
    Problem::new(message)
        .at(at, "unknown input port")
        .suggest(key, ports(), listed)
}

/// Reads a substituted `inputs:` node against the kind's declared input ports.
pub fn read_inputs(
    stage: &str,
    spec: &KindSpec,
    node: Option<&Node>,
    missing_at: SourceSpan,
    problems: &mut Vec<Problem>,
) -> Option<Vec<PortWiring>> {
    let before = problems.len();
    let mut wired = Vec::new();
    let entries = match node.map(|n| &n.value) {
        None | Some(Value::Null) => &[][..],
        Some(Value::Map(m)) => &m.entries[..],
        Some(_) => {
            let n = node?;
            problems.push(
                Problem::must_be(
                    format!("stage `{stage}`: `inputs`"),
                    "a mapping of port -> reference",
                    n,
                )
                .help("e.g. `inputs: { data: prep.data, model: models.base }`"),
            );
            return None;
        }
    };
    for e in entries {
        let Some(port) = spec.inputs.iter().find(|p| p.name == e.key) else {
            problems.push(unknown_port(stage, spec, &e.key, e.key_span));
            continue;
        };
        let items: Vec<&Node> = match &e.value.value {
            Value::Seq(items) => items.iter().collect(),
            _ => vec![&e.value],
        };
        if matches!(e.value.value, Value::Seq(_)) && !port.many && items.len() != 1 {
            problems.push(
                Problem::new(format!(
                    "stage `{stage}`: input port `{}` takes one artifact, but is fed {}",
                    port.name,
                    items.len()
                ))
                .at(e.value.span, "a list here")
                .help(format!("wire a single reference to `{}`; only many-ports (like a report's inputs) take lists", port.name)),
            );
            continue;
        }
        let mut refs = Vec::with_capacity(items.len());
        for item in items {
            let Value::Str(s) = &item.value else {
                problems.push(
                    Problem::must_be(
                        format!("stage `{stage}`: input `{}`", port.name),
                        "a reference string",
                        item,
                    )
                    .help("write `<stage>.<output>`, `models.<name>` or `file:<path>`"),
                );
                continue;
            };
            match parse_ref(s, item.span) {
                Ok(r) => refs.push((r, item.span)),
                Err(msg) => problems.push(
                    Problem::new(format!("stage `{stage}`: {msg}"))
                        .at(item.span, "bad input reference"),
                ),
            }
        }
        wired.push(PortWiring {
            port: port.name.clone(),
            refs,
        });
    }
    for port in &spec.inputs {
        if port.required && !entries.iter().any(|e| e.key == port.name) {
            problems.push(
                Problem::new(format!(
                    "stage `{stage}`: required input port `{}` of kind `{}` is not wired",
                    port.name, spec.name
                ))
                .at(missing_at, format!("`{}` missing", port.name))
                .help(format!(
                    "add `{}: <stage>.<output>` under `inputs:` ({} expected: {})",
                    port.name,
                    port.ty.name(),
                    port.doc
                )),
            );
        }
    }
    (problems.len() == before).then_some(wired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_forms() {
        let sp = SourceSpan::default();
        assert!(
            matches!(parse_ref("prep.data", sp), Ok(InputSpec::Stage { ref stage, ref output, .. }) if stage == "prep" && output == "data")
        );
        match parse_ref("warmup[seed=0,domain=legal].adapter", sp).unwrap() {
            InputSpec::Stage { select, .. } => {
                assert_eq!(select[0].0, "seed");
                assert_eq!(select[0].1.value, Value::Int(0));
                assert_eq!(select[1].1.value, Value::Str("legal".into()));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_ref("models.base", sp),
            Ok(InputSpec::Model { .. })
        ));
        assert!(matches!(
            parse_ref("file:a.b/c.jsonl", sp),
            Ok(InputSpec::File { .. })
        ));
        assert!(parse_ref("nodot", sp).is_err());
        assert!(parse_ref("Bad.x", sp).is_err());
    }
}
