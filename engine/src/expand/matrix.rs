//! `matrix:` grids: axes, `include`/`exclude`, and each cell's coordinates.
//!
//! Cells come out in a fixed order: the cartesian product with the first-written axis
//! outermost, then `include` cells in the order written. Ids name axes sorted
//! (`sft[domain=legal,seed=0]`), so they do not depend on the order axes are written in.

use std::collections::HashSet;

use crate::diagnostics::{list_names, Problem};
use crate::manifest::raw::{float_text, is_valid_name};
use crate::manifest::yaml::{Map, Node, Value};
use crate::pipeline::SourceSpan;

/// At most this many cells per stage; more is almost certainly a mistake (and a huge plan).
pub const MAX_CELLS: usize = 1_000_000;

/// One cell's coordinates, axis -> value (with its location), sorted by axis. A sorted
/// `Vec` rather than a `BTreeMap`: a cell has a handful of axes, and a map's first node
/// takes ~1 KiB whatever it holds, a fifth of a 100,000-cell dry run's memory (issue 22).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Coords(Vec<(String, Node)>);

impl Coords {
    pub fn new() -> Coords {
        Coords(Vec::new())
    }

    fn find(&self, axis: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(axis))
    }

    pub fn get(&self, axis: &str) -> Option<&Node> {
        self.find(axis).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, axis: &str) -> bool {
        self.find(axis).is_ok()
    }

    /// Sets `axis` to `value`, replacing an earlier value.
    pub fn insert(&mut self, axis: String, value: Node) {
        match self.find(&axis) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (axis, value)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Axes and values, sorted by axis.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }
}

impl std::ops::Index<&str> for Coords {
    type Output = Node;
    /// Panics when the axis is absent, like a map's index: callers check first.
    fn index(&self, axis: &str) -> &Node {
        match self.get(axis) {
            Some(v) => v,
            None => panic!("no matrix axis `{axis}` in this cell"),
        }
    }
}

impl FromIterator<(String, Node)> for Coords {
    fn from_iter<I: IntoIterator<Item = (String, Node)>>(iter: I) -> Coords {
        let mut c = Coords::new();
        for (k, v) in iter {
            c.insert(k, v);
        }
        c
    }
}

impl<'a> IntoIterator for &'a Coords {
    type Item = (&'a String, &'a Node);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, Node)>,
        fn(&'a (String, Node)) -> (&'a String, &'a Node),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// A stage's expanded matrix.
#[derive(Debug, Default)]
pub struct Matrix {
    /// Axis names in the order written.
    pub axes: Vec<String>,
    /// Each cell: axis -> value (with the value's location).
    pub cells: Vec<Coords>,
}

/// The identity of an axis value: `1`, `1.0` are the same number; `"1"` is a string.
pub fn value_key(node: &Node) -> String {
    match &node.value {
        Value::Int(i) => format!("n{i}"),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("n{}", *f as i64),
        Value::Float(f) => format!("n{}", float_text(*f)),
        Value::Str(s) => format!("s{s}"),
        Value::Bool(b) => format!("b{b}"),
        Value::Null => "z".to_string(),
        Value::Seq(_) | Value::Map(_) => "?".to_string(),
    }
}

/// An axis value as shown in instance ids.
pub fn value_text(node: &Node) -> String {
    match &node.value {
        Value::Int(i) => i.to_string(),
        Value::Float(f) => float_text(*f),
        Value::Str(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        _ => "?".to_string(),
    }
}

/// `name[a=1,b=x]` (axes sorted) or `name` for a cell without coordinates.
pub fn instance_id(stage: &str, coords: &Coords) -> String {
    if coords.is_empty() {
        return stage.to_string();
    }
    let parts: Vec<String> = coords
        .iter()
        .map(|(k, v)| format!("{k}={}", value_text(v)))
        .collect();
    format!("{stage}[{}]", parts.join(","))
}

/// One axis as written: its name, where, and its values.
type Axis = (String, SourceSpan, Vec<Node>);

/// Expands a `matrix:` node whose references are already substituted: the grid of the axes
/// (last axis fastest), less the `exclude` cells, plus the `include` cells.
pub fn expand(stage: &str, node: &Node, problems: &mut Vec<Problem>) -> Option<Matrix> {
    let Value::Map(map) = &node.value else {
        problems.push(
            Problem::must_be(
                format!("stage `{stage}`: `matrix`"),
                "a mapping of axis -> list of values",
                node,
            )
            .help("e.g. `matrix: { seed: [0, 1], domain: [medical, legal] }`"),
        );
        return None;
    };
    let before = problems.len();
    let axes = axes_of(map, problems);
    let include = entries_of(map, "include", stage, problems);
    let exclude = entries_of(map, "exclude", stage, problems);
    if problems.len() > before {
        return None;
    }
    let mut axis_names: Vec<String> = axes.iter().map(|a| a.0.clone()).collect();
    if axis_names.is_empty() {
        if let Some(first) = include.first() {
            axis_names = first.keys().map(str::to_string).collect();
        }
    }
    let mut cells = grid(stage, node, &axes, problems)?;
    let check = AxisCheck {
        stage,
        names: &axis_names,
    };
    check.known(&exclude, "exclude", problems);
    cells.retain(|cell| !exclude.iter().any(|ex| cell_matches(cell, ex)));
    let mut seen: HashSet<String> = cells.iter().map(cell_key).collect();
    for inc in &include {
        let Some(cell) = check.included_cell(node, inc, problems) else {
            continue;
        };
        if seen.insert(cell_key(&cell)) {
            cells.push(cell);
        }
    }
    if problems.len() > before {
        return None;
    }
    if cells.is_empty() {
        problems.push(expands_to_nothing(stage, node, &axes, !exclude.is_empty()));
        return None;
    }
    Some(Matrix {
        axes: axis_names,
        cells,
    })
}

/// The axes of a matrix mapping (every entry but `include` and `exclude`), each a list of
/// scalars; a bad name or a non-list is a problem and the axis is left out.
fn axes_of(map: &Map, problems: &mut Vec<Problem>) -> Vec<Axis> {
    let mut axes = Vec::new();
    for e in &map.entries {
        if e.key == "include" || e.key == "exclude" {
            continue;
        }
        if !is_valid_name(&e.key) {
            problems.push(
                Problem::new(format!("invalid matrix axis name `{}`", e.key)).at(
                    e.key_span,
                    "axis names are lowercase letters, digits and `_`",
                ),
            );
            continue;
        }
        let Value::Seq(values) = &e.value.value else {
            problems.push(
                Problem::must_be(
                    format!("matrix axis `{}`", e.key),
                    "a list of values",
                    &e.value,
                )
                .help(format!(
                    "write `{}: [a, b]`, or `{}: [value]` for one value",
                    e.key, e.key
                )),
            );
            continue;
        };
        for v in values {
            check_scalar(&e.key, v, problems);
        }
        axes.push((e.key.clone(), e.key_span, values.clone()));
    }
    axes
}

/// Every combination of the axes' values, the first-written axis the outermost loop; none
/// without axes (only `include:`: the grid is empty, not a single empty cell). `None` past
/// [`MAX_CELLS`].
fn grid(
    stage: &str,
    node: &Node,
    axes: &[Axis],
    problems: &mut Vec<Problem>,
) -> Option<Vec<Coords>> {
    if axes.is_empty() {
        return Some(Vec::new());
    }
    let total = axes
        .iter()
        .try_fold(1usize, |acc, a| acc.checked_mul(a.2.len()));
    let Some(total) = total.filter(|&t| t <= MAX_CELLS) else {
        problems.push(
            Problem::new(format!(
                "stage `{stage}`: the matrix has more than {MAX_CELLS} cells"
            ))
            .at(node.span, "too many cells")
            .help("split the sweep or reduce the axes"),
        );
        return None;
    };
    let mut cells = Vec::with_capacity(total);
    for index in 0..total {
        let mut rem = index;
        let mut cell = Coords::new();
        // Last axis varies fastest: the first-written axis is the outermost loop.
        for (name, _, values) in axes.iter().rev() {
            cell.insert(name.clone(), values[rem % values.len()].clone());
            rem /= values.len();
        }
        cells.push(cell);
    }
    Some(cells)
}

/// Whether `cell` has every value an `exclude` entry names.
fn cell_matches(cell: &Coords, ex: &Map) -> bool {
    ex.entries
        .iter()
        .all(|e| cell.get(&e.key).map(value_key) == Some(value_key(&e.value)))
}

/// Checks `include`/`exclude` entries against the matrix's axis names.
struct AxisCheck<'a> {
    stage: &'a str,
    names: &'a [String],
}

impl AxisCheck<'_> {
    fn is_axis(&self, name: &str) -> bool {
        self.names.iter().any(|a| a == name)
    }

    /// A problem for every name in `entries` that is not an axis.
    fn known(&self, entries: &[Map], what: &str, problems: &mut Vec<Problem>) {
        for ex in entries {
            for e in ex.entries.iter().filter(|e| !self.is_axis(&e.key)) {
                problems.push(unknown_axis(
                    self.stage, what, &e.key, e.key_span, self.names,
                ));
            }
        }
    }

    /// The cell an `include` entry names, when it names a value for every axis.
    fn included_cell(&self, node: &Node, inc: &Map, problems: &mut Vec<Problem>) -> Option<Coords> {
        let mut cell = Coords::new();
        for e in &inc.entries {
            if !self.is_axis(&e.key) {
                problems.push(unknown_axis(
                    self.stage, "include", &e.key, e.key_span, self.names,
                ));
                continue;
            }
            check_scalar(&e.key, &e.value, problems);
            cell.insert(e.key.clone(), e.value.clone());
        }
        let missing: Vec<&str> = (self.names.iter())
            .filter(|a| !cell.contains_key(a))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return Some(cell);
        }
        problems.push(
            Problem::new(format!(
                "stage `{}`: an `include` entry gives no value for {}",
                self.stage,
                list_names(missing.iter().copied())
            ))
            .at(
                inc.entries.first().map_or(node.span, |e| e.key_span),
                "incomplete cell",
            )
            .help("each included cell names a value for every axis"),
        );
        None
    }
}

/// Why a matrix has no cells: an axis without values, an `exclude` that removes all, or
/// nothing declared.
fn expands_to_nothing(stage: &str, node: &Node, axes: &[Axis], excluded: bool) -> Problem {
    let problem = Problem::new(format!("stage `{stage}`: the matrix expands to nothing"));
    if let Some((name, span, _)) = axes.iter().find(|a| a.2.is_empty()) {
        return problem
            .at(*span, format!("axis `{name}` has no values"))
            .help("give the axis at least one value, or remove the `matrix:`");
    }
    let reason = if excluded {
        "`exclude` removes every cell"
    } else {
        "it has no axes and no `include` cells"
    };
    problem
        .at(node.span, reason)
        .help("a matrix stage needs at least one cell; check the axes and `exclude` entries")
}

fn cell_key(cell: &Coords) -> String {
    let mut key = String::new();
    for (k, v) in cell {
        key.push_str(k);
        key.push('=');
        key.push_str(&value_key(v));
        key.push('\u{1f}');
    }
    key
}

fn check_scalar(axis: &str, v: &Node, problems: &mut Vec<Problem>) {
    if !matches!(
        v.value,
        Value::Int(_) | Value::Float(_) | Value::Str(_) | Value::Bool(_)
    ) {
        problems.push(
            Problem::new(format!("matrix axis `{axis}`: values must be strings, numbers or booleans"))
                .at_type_of(v)
                .help("to sweep over combinations of settings, use one axis per setting, or `include:` cells"),
        );
    }
}

fn entries_of(map: &Map, key: &str, stage: &str, problems: &mut Vec<Problem>) -> Vec<Map> {
    let Some(node) = map.get(key) else {
        return Vec::new();
    };
    let Value::Seq(items) = &node.value else {
        problems.push(
            Problem::must_be(
                format!("stage `{stage}`: matrix `{key}`"),
                "a list of cells",
                node,
            )
            .help(format!("e.g. `{key}: [{{seed: 0, domain: legal}}]`")),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        match &item.value {
            Value::Map(m) => out.push(m.clone()),
            _ => problems.push(Problem::must_be(
                format!("stage `{stage}`: each matrix `{key}` entry"),
                "a mapping of axis -> value",
                item,
            )),
        }
    }
    out
}

fn unknown_axis(
    stage: &str,
    section: &str,
    axis: &str,
    span: SourceSpan,
    axes: &[String],
) -> Problem {
    let axes = || axes.iter().map(String::as_str);
    Problem::new(format!(
        "stage `{stage}`: matrix `{section}` names unknown axis `{axis}`"
    ))
    .at(span, "not an axis")
    .suggest(axis, axes(), || {
        format!("the axes are {}", list_names(axes()))
    })
}
