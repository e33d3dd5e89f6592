//! `${...}` references: parsing them out of strings and substituting them in located trees.
//!
//! A string that is exactly one reference (`steps: ${n_train}`) becomes the referenced value
//! with its type (an int stays an int, a list stays a list); a reference inside a longer
//! string is interpolated and must be a scalar. `$${` writes a literal `${`. What a root name
//! means (a top-level param, or `matrix.<axis>` in a matrix stage) is up to the caller's
//! [`RefSource`], which is how top-level params resolve lazily with cycle detection.

use std::borrow::Cow;
use std::cell::Cell;

use crate::diagnostics::Problem;
use crate::manifest::raw::float_text;
use crate::manifest::source::span_between;
use crate::manifest::yaml::{Map, Node, Value};
use crate::pipeline::SourceSpan;

/// A piece of a string: literal text or a reference `${path}`.
#[derive(Debug, PartialEq)]
pub enum Piece<'s> {
    Text(Cow<'s, str>),
    /// The dotted path inside `${}`, and the byte range of the whole `${...}` in the string.
    Ref {
        path: &'s str,
        start: usize,
        end: usize,
    },
}

/// Splits a string into literal text and references. Errors give the byte offset of the
/// problem inside the string.
pub fn parse_template(s: &str) -> Result<Vec<Piece<'_>>, (usize, String)> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest_start = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && s[i..].starts_with("$${") {
            text.push_str(&s[rest_start..i]);
            text.push_str("${");
            i += 3;
            rest_start = i;
        } else if bytes[i] == b'$' && s[i..].starts_with("${") {
            text.push_str(&s[rest_start..i]);
            let Some(close) = closing_brace(&s[i + 2..]) else {
                return Err((
                    i,
                    "unterminated reference: `${` without a closing `}`".to_string(),
                ));
            };
            let path = &s[i + 2..i + 2 + close];
            if path.trim().is_empty() {
                return Err((i, format!("malformed reference `${{{path}}}`")));
            }
            if !text.is_empty() {
                pieces.push(Piece::Text(Cow::Owned(std::mem::take(&mut text))));
            }
            let end = i + 2 + close + 1;
            pieces.push(Piece::Ref {
                path: path.trim(),
                start: i,
                end,
            });
            i = end;
            rest_start = i;
        } else {
            i += 1;
        }
    }
    text.push_str(&s[rest_start..]);
    if !text.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Text(Cow::Owned(text)));
    }
    Ok(pieces)
}

/// The offset of the `}` closing a reference whose body starts `body`, skipping nested
/// references (`${graders.${matrix.domain}}` looks up a map param by a matrix value).
fn closing_brace(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut depth = 1usize;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && body[i..].starts_with("${") {
            depth += 1;
            i += 2;
            continue;
        }
        if bytes[i] == b'}' {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
        i += 1;
    }
    None
}

/// Whether a string may contain references (a cheap pre-check before parsing).
pub fn has_refs(s: &str) -> bool {
    s.contains("${")
}

/// The span of bytes `start..end` of a string node's value, when the string is written
/// verbatim in the source; the whole node otherwise.
pub fn sub_span(node: &Node, start: usize, end: usize) -> SourceSpan {
    match node.text_start {
        Some(t) => span_between(t + start, t + end),
        None => node.span,
    }
}

/// The most values that references may copy in one manifest load, all references together.
pub const MAX_COPY_NODES: usize = 500_000;
/// The most bytes of text (strings and keys) that references may copy in one load.
pub const MAX_COPY_BYTES: usize = 16 << 20;

/// What references have copied in one manifest load. Like aliases, references to values
/// that repeat references grow exponentially (`b: "${a}${a}"`, `c: "${b}${b}"`, ... doubles
/// at each step), so every copy is counted, and the first to cross [`MAX_COPY_NODES`] or
/// [`MAX_COPY_BYTES`] is reported; after that every reference fails quietly.
#[derive(Debug, Default)]
pub struct CopyBudget {
    nodes: Cell<usize>,
    bytes: Cell<usize>,
    spent: Cell<bool>,
}

impl CopyBudget {
    /// Counts a copy of `nodes` values holding `bytes` of text, made by the reference at
    /// `at`; `false` (reported once) when the budget is spent.
    pub fn charge(
        &self,
        (nodes, bytes): (usize, usize),
        at: SourceSpan,
        problems: &mut Vec<Problem>,
    ) -> bool {
        if self.spent.get() {
            return false;
        }
        let (n, b) = (self.nodes.get() + nodes, self.bytes.get() + bytes);
        self.nodes.set(n);
        self.bytes.set(b);
        if n <= MAX_COPY_NODES && b <= MAX_COPY_BYTES {
            return true;
        }
        self.spent.set(true);
        problems.push(
            Problem::new(format!(
                "references in this manifest copy more than {MAX_COPY_NODES} values or {} MiB \
                 of text in all",
                MAX_COPY_BYTES >> 20
            ))
            .at(at, "this reference crosses the limit")
            .help(
                "each `${...}` copies the value it names, so params that repeat references to \
                 params that repeat references grow exponentially (`b: \"${a}${a}\"`, \
                 `c: \"${b}${b}\"`, ...); refer to large values fewer times",
            ),
        );
        false
    }
}

/// The values and text bytes in `node`, for [`CopyBudget::charge`] (iterative: a value
/// built by references may nest deeper than the parser allows).
pub fn weight(node: &Node) -> (usize, usize) {
    let (mut nodes, mut bytes) = (0, 0);
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        nodes += 1;
        match &n.value {
            Value::Str(s) => bytes += s.len(),
            Value::Seq(items) => stack.extend(items),
            Value::Map(m) => {
                for e in &m.entries {
                    bytes += e.key.len();
                    stack.push(&e.value);
                }
            }
            _ => {}
        }
    }
    (nodes, bytes)
}

/// A reference being resolved: its root name (`seed` in `${seed.x}`, or `matrix` for
/// `${matrix.axis}`), the rest of its dotted path (`x`, or the axis; may be empty), and where
/// it is written.
#[derive(Clone, Copy, Debug)]
pub struct RefRoot<'a> {
    pub root: &'a str,
    pub rest: &'a str,
    pub at: SourceSpan,
}

/// Resolves the root name of a reference.
pub trait RefSource {
    /// The value `r.root` stands for, or `None` after reporting why there is none.
    fn lookup(&mut self, r: RefRoot, problems: &mut Vec<Problem>) -> Option<Node>;

    /// The load's budget for what references copy.
    fn budget(&self) -> &CopyBudget;
}

/// Substitutes every reference in `node`. Returns `None` when any reference failed (each
/// failure is reported once in `problems`).
pub fn substitute(
    node: &Node,
    src: &mut dyn RefSource,
    problems: &mut Vec<Problem>,
) -> Option<Node> {
    match &node.value {
        Value::Str(s) if has_refs(s) => substitute_str(node, s, src, problems),
        Value::Seq(items) => {
            let mut out = Vec::with_capacity(items.len());
            let mut ok = true;
            for item in items {
                match substitute(item, src, problems) {
                    Some(n) => out.push(n),
                    None => ok = false,
                }
            }
            ok.then(|| Node {
                value: Value::Seq(out),
                ..node.clone_shallow()
            })
        }
        Value::Map(map) => {
            let mut out = Map {
                entries: Vec::with_capacity(map.entries.len()),
            };
            let mut ok = true;
            for e in &map.entries {
                match substitute(&e.value, src, problems) {
                    Some(v) => out.entries.push(crate::manifest::yaml::Entry {
                        key: e.key.clone(),
                        key_span: e.key_span,
                        value: v,
                    }),
                    None => ok = false,
                }
            }
            ok.then(|| Node {
                value: Value::Map(out),
                ..node.clone_shallow()
            })
        }
        _ => Some(node.clone()),
    }
}

fn substitute_str(
    node: &Node,
    s: &str,
    src: &mut dyn RefSource,
    problems: &mut Vec<Problem>,
) -> Option<Node> {
    let pieces = match parse_template(s) {
        Ok(p) => p,
        Err((at, msg)) => {
            problems.push(
                Problem::new(msg)
                    .at(sub_span(node, at, s.len()), "here")
                    .help("references look like `${param}`, `${param.key}` or `${matrix.axis}`; write `$${` for a literal `${`"),
            );
            return None;
        }
    };
    // A whole-value reference keeps the referenced value's type.
    if let [Piece::Ref { path, start, end }] = pieces.as_slice() {
        let at = sub_span(node, *start, *end);
        let value = lookup_path(path, at, src, problems)?;
        if !src.budget().charge(weight(&value), at, problems) {
            return None;
        }
        return Some(Node {
            span: node.span,
            value: value.value,
            text_start: None,
        });
    }
    let mut out = String::with_capacity(s.len());
    let mut ok = true;
    for piece in &pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Ref { path, start, end } => {
                let at = sub_span(node, *start, *end);
                let Some(value) = lookup_path(path, at, src, problems) else {
                    ok = false;
                    continue;
                };
                if !src.budget().charge(weight(&value), at, problems) {
                    return None;
                }
                match &value.value {
                    Value::Str(v) => out.push_str(v),
                    Value::Int(i) => out.push_str(&i.to_string()),
                    Value::Float(f) => out.push_str(&float_text(*f)),
                    Value::Bool(b) => out.push_str(&b.to_string()),
                    _ => {
                        problems.push(
                            Problem::new(format!("`${{{path}}}` is {} and cannot be put inside a string", value.type_name()))
                                .at(at, "not a plain value")
                                .help("only strings, numbers and booleans can be interpolated; to use the value itself, make `${...}` the whole value"),
                        );
                        ok = false;
                    }
                }
            }
        }
    }
    ok.then_some(Node {
        span: node.span,
        value: Value::Str(out),
        text_start: None,
    })
}

/// Looks up `a.b.c`: the root through `src`, the rest by walking into the value.
fn lookup_path(
    path: &str,
    at: SourceSpan,
    src: &mut dyn RefSource,
    problems: &mut Vec<Problem>,
) -> Option<Node> {
    let resolved;
    let path = if has_refs(path) {
        let inner = Node {
            span: at,
            value: Value::Str(path.to_string()),
            text_start: None,
        };
        let name = substitute_str(&inner, path, src, problems)?;
        match &name.value {
            Value::Str(p) => {
                resolved = p.clone();
                resolved.as_str()
            }
            Value::Int(i) => {
                resolved = i.to_string();
                resolved.as_str()
            }
            _ => {
                problems.push(
                    Problem::new(format!("a nested reference in `${{{path}}}` gives {}, not a name", name.type_name()))
                        .at(at, "here")
                        .help("a reference inside a reference must give a string or number, e.g. `${graders.${matrix.domain}}`"),
                );
                return None;
            }
        }
    } else {
        path
    };
    let (root, rest) = path.split_once('.').unwrap_or((path, ""));
    let value = src.lookup(RefRoot { root, rest, at }, problems)?;
    if root == "matrix" || rest.is_empty() {
        return Some(value);
    }
    let (found, complete) = value.walk(rest);
    if complete {
        return Some(found.clone());
    }
    let keys: Vec<&str> = found
        .as_map()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    problems.push(
        Problem::new(format!("`${{{path}}}`: `{root}` has no `{rest}`"))
            .at(at, "not found")
            .maybe_help(crate::diagnostics::did_you_mean(
                rest.rsplit('.').next().unwrap_or(rest),
                keys.iter().copied(),
            )),
    );
    None
}

impl Node {
    /// A copy of the node's location without its children (the caller supplies the value).
    fn clone_shallow(&self) -> Node {
        Node {
            span: self.span,
            value: Value::Null,
            text_start: self.text_start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_references_parse_as_one_reference() {
        let pieces = parse_template("g/${graders.${matrix.domain}}.txt").unwrap();
        assert_eq!(pieces.len(), 3);
        match &pieces[1] {
            Piece::Ref { path, .. } => assert_eq!(*path, "graders.${matrix.domain}"),
            other => panic!("expected a reference, got {other:?}"),
        }
        assert!(parse_template("${a.${b}").is_err());
    }

    #[test]
    fn templates_split_into_text_and_references() {
        assert_eq!(
            parse_template("run-${seed}-x").unwrap(),
            vec![
                Piece::Text("run-".into()),
                Piece::Ref {
                    path: "seed",
                    start: 4,
                    end: 11
                },
                Piece::Text("-x".into())
            ]
        );
        assert_eq!(
            parse_template("$${x}").unwrap(),
            vec![Piece::Text("${x}".into())]
        );
        assert!(parse_template("a ${b").is_err());
        assert!(parse_template("${}").is_err());
    }
}
