//! Top-level params: resolved once, lazily, in dependency order, with cycle detection.
//!
//! A param may reference others (`out: "run-${seed}"`); resolving on demand with a stack of
//! params in progress finds the order without building a graph first, and a reference back
//! into the stack is a cycle, reported with its whole path (`a -> b -> a`).

use std::collections::HashMap;

use crate::diagnostics::{list_names, Problem};
use crate::expand::refs::{substitute, CopyBudget, RefRoot, RefSource};
use crate::manifest::yaml::{Entry, Map, Node};
use crate::pipeline::SourceSpan;

enum State {
    InProgress,
    Done(Node),
    Failed,
}

/// Resolves the manifest's top-level params.
pub struct ParamResolver<'m> {
    raw: &'m Map,
    /// The entries of `raw` by name: a lookup per reference must not scan every param.
    index: HashMap<&'m str, &'m Entry>,
    state: HashMap<String, State>,
    /// Params being resolved, outermost first, with where each is defined.
    stack: Vec<(String, SourceSpan)>,
    budget: CopyBudget,
}

/// The resolved params: name -> value, and the names that failed (already reported), so that
/// uses of a broken param do not add a second error.
#[derive(Default)]
pub struct ResolvedParams {
    pub values: HashMap<String, Node>,
    pub failed: std::collections::HashSet<String>,
    /// Names in manifest order, for hints.
    pub names: Vec<String>,
    /// What references have copied so far in this load (params' and stages' together).
    pub budget: CopyBudget,
}

impl<'m> ParamResolver<'m> {
    pub fn resolve_all(raw: &'m Map, problems: &mut Vec<Problem>) -> ResolvedParams {
        let mut r = ParamResolver {
            raw,
            index: raw.entries.iter().map(|e| (e.key.as_str(), e)).collect(),
            state: HashMap::new(),
            stack: Vec::new(),
            budget: CopyBudget::default(),
        };
        for e in &raw.entries {
            r.resolve(&e.key, problems);
        }
        let mut out = ResolvedParams {
            names: raw.keys().map(str::to_string).collect(),
            budget: std::mem::take(&mut r.budget),
            ..Default::default()
        };
        for (name, state) in r.state {
            match state {
                State::Done(node) => {
                    out.values.insert(name, node);
                }
                _ => {
                    out.failed.insert(name);
                }
            }
        }
        out
    }

    fn resolve(&mut self, name: &str, problems: &mut Vec<Problem>) -> Option<Node> {
        match self.state.get(name) {
            Some(State::Done(n)) => return Some(n.clone()),
            // In progress only through a cycle, which `lookup` reports before recursing.
            Some(State::Failed | State::InProgress) => return None,
            None => {}
        }
        let entry = *self.index.get(name)?;
        self.state.insert(name.to_string(), State::InProgress);
        self.stack.push((name.to_string(), entry.key_span));
        let resolved = substitute(&entry.value, self, problems);
        self.stack.pop();
        let state = match &resolved {
            Some(n) => State::Done(n.clone()),
            None => State::Failed,
        };
        self.state.insert(name.to_string(), state);
        resolved
    }
}

impl RefSource for ParamResolver<'_> {
    fn lookup(&mut self, r: RefRoot, problems: &mut Vec<Problem>) -> Option<Node> {
        let RefRoot { root, at, .. } = r;
        if root == "matrix" {
            problems.push(
                Problem::new("`${matrix.…}` can only be used inside a matrix stage")
                    .at(at, "top-level params have no matrix cell")
                    .help("move this reference into the `params:` of the stage that has the `matrix:`"),
            );
            return None;
        }
        if matches!(self.state.get(root), Some(State::InProgress)) {
            let start = self.stack.iter().position(|(n, _)| n == root).unwrap_or(0);
            let mut cycle: Vec<&str> = self.stack[start..]
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            cycle.push(root);
            let mut p = Problem::new(format!(
                "params reference each other in a cycle: {}",
                cycle.join(" -> ")
            ))
            .at(
                at,
                format!(
                    "`{}` refers back to `{root}`",
                    self.stack.last().map_or(root, |(n, _)| n.as_str())
                ),
            );
            for (name, span) in &self.stack[start..] {
                p = p.at(*span, format!("`{name}` defined here"));
            }
            problems.push(p.help(
                "a param cannot depend on itself; replace one reference in the cycle by a value",
            ));
            // Mark every member failed so the cycle is reported once.
            for (name, _) in &self.stack[start..] {
                self.state.insert(name.clone(), State::Failed);
            }
            return None;
        }
        if !self.index.contains_key(root) {
            problems.push(unknown_param(root, at, self.raw.keys()));
            return None;
        }
        self.resolve(root, problems)
    }

    fn budget(&self) -> &CopyBudget {
        &self.budget
    }
}

pub fn unknown_param<'a>(
    name: &str,
    at: SourceSpan,
    known: impl Iterator<Item = &'a str>,
) -> Problem {
    Problem::new(format!("reference to unknown param `{name}`"))
        .at(at, "no such param")
        .suggest(name, known, || {
            "references name a param declared under the top-level `params:`".to_string()
        })
}

/// What a stage's params, inputs and resources can reference: resolved top-level params, and
/// in a matrix stage the cell's values.
pub struct StageScope<'a> {
    pub params: &'a ResolvedParams,
    /// Axis -> this cell's value; `None` outside matrix stages.
    pub matrix: Option<&'a crate::expand::matrix::Coords>,
    pub stage: &'a str,
}

impl RefSource for StageScope<'_> {
    fn lookup(&mut self, r: RefRoot, problems: &mut Vec<Problem>) -> Option<Node> {
        let RefRoot { root, rest, at } = r;
        if root == "matrix" {
            let Some(cell) = self.matrix else {
                problems.push(
                    Problem::new(format!(
                        "`${{matrix.{rest}}}` used in stage `{}`, which has no matrix",
                        self.stage
                    ))
                    .at(at, "no matrix here")
                    .help("add `matrix:` with this axis to the stage, or use a param"),
                );
                return None;
            };
            return match cell.get(rest) {
                Some(v) => Some(v.clone()),
                None => {
                    let axes = || cell.keys().map(String::as_str);
                    let listed = || format!("this stage's axes are {}", list_names(axes()));
                    let message = format!("stage `{}` has no matrix axis `{rest}`", self.stage);
                    problems.push(Problem::new(message).at(at, "unknown axis").suggest(
                        rest,
                        axes(),
                        listed,
                    ));
                    None
                }
            };
        }
        if let Some(v) = self.params.values.get(root) {
            return Some(v.clone());
        }
        if !self.params.failed.contains(root) {
            problems.push(unknown_param(
                root,
                at,
                self.params.names.iter().map(String::as_str),
            ));
        }
        None
    }

    fn budget(&self) -> &CopyBudget {
        &self.params.budget
    }
}
