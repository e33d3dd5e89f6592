//! A stage's params against its kind's [`KindSpec`]: names, types, required params, defaults,
//! and the kind's own [`StageKind::check`], each problem located in the manifest.
//!
//! Each declared param is checked for its type (`null` only where the param is nullable)
//! and, for numbers, its range; an unknown name gets a "did you mean". Every problem points
//! at the manifest value with a hint built from the spec (the param's type, range and doc).
//!
//! The result is the canonical param object the stage is keyed and run with: declared params
//! in the spec's order (so key order in the manifest never matters), then any extra params of
//! an open kind in manifest order; non-nullable `Float` params always hold floats (`1` and
//! `1.0` are equal, see [`ParamSpec::keys_as_float`]).

use crate::diagnostics::{list_names, Problem};
use crate::kind::{KindSpec, ParamError, ParamSpec, ParamType, Params, StageKind};
use crate::manifest::yaml::{Map, Node, Value};
use crate::pipeline::SourceSpan;
use serde_json::Value as J;

/// Where a stage's params are, for messages.
pub struct ParamsSite<'a> {
    pub stage: &'a str,
    /// Reported for a missing required param: the `params:` key, or the stage name.
    pub missing_at: SourceSpan,
}

/// Checks `node` (the substituted `params:` mapping; `None` when absent) and returns the
/// canonical params, or `None` after reporting every problem.
pub fn check_params(
    site: &ParamsSite<'_>,
    spec: &KindSpec,
    kind: &dyn StageKind,
    node: Option<&Node>,
    problems: &mut Vec<Problem>,
) -> Option<Params> {
    let empty = Map::default();
    let map = match node.map(|n| (&n.value, n)) {
        None | Some((Value::Null, _)) => &empty,
        Some((Value::Map(m), _)) => m,
        Some((_, n)) => {
            problems.push(Problem::must_be(
                format!("stage `{}`: `params`", site.stage),
                "a mapping",
                n,
            ));
            return None;
        }
    };
    let before = problems.len();
    let mut params = Params::new();
    for p in &spec.params {
        match map.entry(&p.name) {
            Some(e) => {
                if let Some(v) = typed_value(site, spec, p, &e.value, problems) {
                    params.insert(p.name.clone(), v);
                }
            }
            None => match &p.default {
                Some(d) => {
                    params.insert(p.name.clone(), d.clone());
                }
                None => problems.push(
                    Problem::new(format!(
                        "stage `{}`: missing required param `{}` of kind `{}`",
                        site.stage, p.name, spec.name
                    ))
                    .at(site.missing_at, format!("`{}` is not set", p.name))
                    .help(format!(
                        "add `{}: ...` under `params:` ({}: {})",
                        p.name,
                        p.ty.describe(),
                        p.summary()
                    )),
                ),
            },
        }
    }
    for e in &map.entries {
        if spec.params.iter().any(|p| p.name == e.key) {
            continue;
        }
        if spec.open_params {
            match e.value.to_json() {
                Ok(v) => {
                    params.insert(e.key.clone(), v);
                }
                Err(p) => problems.push(p),
            }
            continue;
        }
        let names = spec.params.iter().map(|p| p.name.as_str());
        let listed = || format!("kind `{}` takes {}", spec.name, list_names(names.clone()));
        let message = format!(
            "stage `{}`: unknown param `{}` for kind `{}`",
            site.stage, e.key, spec.name
        );
        problems.push(
            Problem::new(message)
                .at(e.key_span, "unknown param")
                .suggest(&e.key, names.clone(), listed),
        );
    }
    if problems.len() > before {
        return None;
    }
    if let Err(errors) = kind.check(&params) {
        report_kind_errors(site, node, errors, problems);
        return None;
    }
    Some(params)
}

/// A kind's own findings ([`StageKind::check`], [`StageKind::check_files`]), each at its
/// param's place below `node` (the stage's `params:`), or at `site.missing_at`.
pub fn report_kind_errors(
    site: &ParamsSite<'_>,
    node: Option<&Node>,
    errors: Vec<ParamError>,
    problems: &mut Vec<Problem>,
) {
    for err in errors {
        let span = locate(node, &err.param).unwrap_or(site.missing_at);
        let mut p = Problem::new(format!("stage `{}`: {}", site.stage, err.message))
            .at(span, format!("param `{}`", err.param));
        if let Some(h) = err.hint {
            p = p.help(h);
        }
        problems.push(p);
    }
}

/// The span of a dotted param path below `params:`, or of its deepest written ancestor.
pub fn locate(node: Option<&Node>, path: &str) -> Option<SourceSpan> {
    let node = node?;
    let (found, _) = node.walk(path);
    Some(found.span)
}

/// The JSON value of a declared param, checked against its type and range.
fn typed_value(
    site: &ParamsSite<'_>,
    spec: &KindSpec,
    p: &ParamSpec,
    v: &Node,
    problems: &mut Vec<Problem>,
) -> Option<J> {
    if matches!(v.value, Value::Null) && p.nullable {
        return Some(J::Null);
    }
    let number = match (&p.ty, &v.value) {
        (ParamType::Int, Value::Int(i)) => Some(*i as f64),
        (ParamType::Float, Value::Int(i)) => Some(*i as f64),
        (ParamType::Float, Value::Float(f)) if f.is_finite() => Some(*f),
        _ => None,
    };
    if let Some(x) = number {
        if !p.range.contains(x) {
            problems.push(out_of_range(site, spec, p, v));
            return None;
        }
        if p.keys_as_float() {
            return Some(float(x));
        }
    }
    let ok = match (&p.ty, &v.value) {
        (ParamType::Any, _) => true,
        (ParamType::Bool, Value::Bool(_)) => true,
        (ParamType::Int, Value::Int(_)) => true,
        (ParamType::Float, Value::Int(_)) => true,
        (ParamType::Float, Value::Float(f)) => f.is_finite(),
        (ParamType::String, Value::Str(_)) => true,
        (ParamType::List, Value::Seq(_)) => true,
        (ParamType::Map, Value::Map(_)) => true,
        (ParamType::Enum(options), Value::Str(s)) => {
            if options.contains(s) {
                return Some(J::String(s.clone()));
            }
            problems.push(not_an_option(site, p, v, s, options));
            return None;
        }
        _ => false,
    };
    if !ok {
        problems.push(wrong_type(site, spec, p, v));
        return None;
    }
    match v.to_json() {
        Ok(j) => Some(j),
        Err(e) => {
            problems.push(e);
            None
        }
    }
}

/// What the spec says about `p`, for hints: "`lr` of kind `sft` is a number >= 0: peak ...".
fn spec_hint(spec: &KindSpec, p: &ParamSpec) -> String {
    let mut text = format!(
        "`{}` of kind `{}` is {}",
        p.name,
        spec.name,
        p.ty.describe()
    );
    if !p.range.is_unbounded() {
        text = format!("{text} {}", p.range.phrase());
    }
    if p.nullable {
        text.push_str(" or null");
    }
    match p.summary() {
        "" => text,
        doc => format!("{text}: {doc}"),
    }
}

fn out_of_range(site: &ParamsSite<'_>, spec: &KindSpec, p: &ParamSpec, v: &Node) -> Problem {
    let shown = crate::manifest::raw::show(v);
    Problem::new(format!(
        "stage `{}`: param `{}` must be {}, not {shown}",
        site.stage,
        p.name,
        p.range.phrase()
    ))
    .at(v.span, format!("out of range {}", p.range))
    .help(spec_hint(spec, p))
}

fn not_an_option(
    site: &ParamsSite<'_>,
    p: &ParamSpec,
    v: &Node,
    s: &str,
    options: &[String],
) -> Problem {
    let names = || options.iter().map(String::as_str);
    Problem::new(format!(
        "stage `{}`: param `{}` must be one of {}",
        site.stage,
        p.name,
        list_names(names())
    ))
    .at(v.span, format!("`{s}` is not an option"))
    .suggest(s, names(), || format!("use one of {}", list_names(names())))
}

fn wrong_type(site: &ParamsSite<'_>, spec: &KindSpec, p: &ParamSpec, v: &Node) -> Problem {
    let mut help = spec_hint(spec, p);
    if matches!(p.ty, ParamType::String)
        && matches!(v.value, Value::Int(_) | Value::Float(_) | Value::Bool(_))
    {
        help = format!(
            "quote it to make it a string: `\"{}\"`",
            crate::manifest::raw::show(v).trim_matches('"')
        );
    } else if matches!(v.value, Value::Null) {
        help = format!("give it a value, or remove the line to use the kind's default; {help}");
    }
    Problem::new(format!(
        "stage `{}`: param `{}` must be {}, not {}",
        site.stage,
        p.name,
        p.ty.describe(),
        v.type_name()
    ))
    .at_type_of(v)
    .help(help)
}

fn float(f: f64) -> J {
    serde_json::Number::from_f64(f).map_or(J::Null, J::Number)
}
