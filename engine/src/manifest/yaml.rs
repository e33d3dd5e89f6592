//! YAML to a tree that remembers where every key and value was written.
//!
//! serde_yaml gives no locations for values, and a manifest diagnostic is only useful when
//! it points at the line and column of the offending value. So the manifest is read once,
//! from saphyr's event stream (which carries start and end markers), into [`Node`]s that hold
//! their global [`SourceSpan`] (see [`super::source`]). Building the tree ourselves also means
//! one parser decides the semantics: anchors and aliases (an alias is a copy of the anchored
//! node, located where the alias is written), YAML 1.1 merge keys (`<<: *base`, explicit keys
//! win, earlier merged maps win over later ones), duplicate keys (an error), and scalar types
//! by the YAML 1.2 core schema (`yes` is a string, `1e-4` is a float).
//!
//! Parsing is bounded, so that a small hostile or broken file cannot take the process down:
//! the text may be at most [`MAX_TEXT_BYTES`], collections nest at most [`MAX_DEPTH`] deep
//! (later passes walk the tree recursively), and aliases together may copy at most
//! [`MAX_ALIAS_NODES`] values and [`MAX_ALIAS_BYTES`] of text (each alias copies its
//! anchor's whole value, so nested aliases grow exponentially: a 1 KB "billion laughs" file
//! would expand to gigabytes). Each limit stops the parse at once with an error located
//! where it was crossed.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use saphyr_parser::{Event, Parser, ScalarStyle, Span as YamlSpan, Tag};

use crate::diagnostics::Problem;
use crate::manifest::source::{span_between, span_end};
use crate::pipeline::SourceSpan;

/// The largest manifest (or `--set` value) read, in bytes.
pub const MAX_TEXT_BYTES: usize = 16 << 20;
/// The deepest nesting of lists and mappings, counting those copied in by aliases.
pub const MAX_DEPTH: usize = 128;
/// The most values that aliases may copy into one document, all aliases together.
pub const MAX_ALIAS_NODES: usize = 250_000;
/// The most bytes of strings and keys that aliases may copy into one document, all aliases
/// together: few values can still carry much text.
pub const MAX_ALIAS_BYTES: usize = 4 << 20;

/// A YAML value and where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub span: SourceSpan,
    pub value: Value,
    /// For a string whose characters map one-to-one onto the source (plain scalars, quoted
    /// ones without escapes): the global offset of its first character. Lets a diagnostic
    /// point at a `${...}` inside a longer string instead of at the whole string.
    pub text_start: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Map),
}

/// A mapping in the order written. Keys are strings (YAML keys are read as written).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Map {
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_span: SourceSpan,
    pub value: Node,
}

impl Map {
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|e| &e.value)
    }

    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    pub fn entry_mut(&mut self, key: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.key == key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.key.as_str())
    }

    /// Replaces the value under `key`, or appends a new entry.
    pub fn set(&mut self, key: &str, key_span: SourceSpan, value: Node) {
        match self.entry_mut(key) {
            Some(e) => e.value = value,
            None => self.entries.push(Entry {
                key: key.to_string(),
                key_span,
                value,
            }),
        }
    }
}

impl Node {
    pub fn new(span: SourceSpan, value: Value) -> Self {
        Node {
            span,
            value,
            text_start: None,
        }
    }

    pub fn as_map(&self) -> Option<&Map> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// What the value is, for messages: "a string", "a list", ...
    pub fn type_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "null (no value)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The same tree as JSON. YAML's `.inf` and `.nan` have no JSON form: an error here.
    pub fn to_json(&self) -> Result<serde_json::Value, Problem> {
        use serde_json::Value as J;
        Ok(match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => J::Number(n),
                None => {
                    return Err(Problem::new(format!("`{f}` cannot be used as a value"))
                        .at(self.span, "not a finite number")
                        .help("params are stored as JSON, which has no infinity or NaN; use a large finite number"))
                }
            },
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect::<Result<_, _>>()?),
            Value::Map(map) => {
                let mut out = serde_json::Map::with_capacity(map.entries.len());
                for e in &map.entries {
                    out.insert(e.key.clone(), e.value.to_json()?);
                }
                J::Object(out)
            }
        })
    }

    /// Walks a dotted path (`ops.2.take`): map keys by name, list items by index. Returns
    /// the deepest node reached and whether the whole path was found.
    pub fn walk<'a>(&'a self, path: &str) -> (&'a Node, bool) {
        let mut node = self;
        if path.is_empty() {
            return (node, true);
        }
        for part in path.split('.') {
            let next = match &node.value {
                Value::Map(m) => m.get(part),
                Value::Seq(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => return (node, false),
            }
        }
        (node, true)
    }
}

impl Problem {
    /// Labels `node` with what it is ("this is a list"): how every problem with a value of the
    /// wrong type or shape points at that value. Here, next to [`Node::type_name`], because
    /// `diagnostics` knows nothing of the YAML tree.
    pub fn at_type_of(self, node: &Node) -> Self {
        self.at(node.span, format!("this is {}", node.type_name()))
    }

    /// "`what` must be `shape`" (e.g. "stage `a`: `inputs`", "a mapping of port -> reference"),
    /// at `node`, labelled with what it is instead.
    pub fn must_be(what: impl std::fmt::Display, shape: &str, node: &Node) -> Self {
        Problem::new(format!("{what} must be {shape}")).at_type_of(node)
    }
}

/// Maps saphyr's character indices to global byte offsets.
struct Offsets {
    base: usize,
    len: usize,
    /// Byte offset of each character; `None` when the text is ASCII (index = offset).
    table: Option<Vec<usize>>,
}

impl Offsets {
    fn new(text: &str, base: usize) -> Self {
        let table = (!text.is_ascii()).then(|| {
            text.char_indices()
                .map(|(i, _)| i)
                .chain(std::iter::once(text.len()))
                .collect()
        });
        Offsets {
            base,
            len: text.len(),
            table,
        }
    }

    fn at(&self, char_index: usize) -> usize {
        self.base
            + match &self.table {
                None => char_index.min(self.len),
                Some(t) => t.get(char_index).copied().unwrap_or(self.len),
            }
    }

    fn span(&self, s: &YamlSpan) -> SourceSpan {
        span_between(self.at(s.start.index()), self.at(s.end.index()))
    }
}

/// How big a built node is: its values in all (itself included), the bytes of its strings
/// and keys, and how many collections deep it goes (0 for a scalar). What an alias to it
/// would add.
#[derive(Clone, Copy, Debug, Default)]
struct Shape {
    size: usize,
    bytes: usize,
    height: usize,
}

impl Shape {
    /// A scalar's shape: one value, and its text when it is a string.
    fn scalar(value: &Value) -> Shape {
        Shape {
            size: 1,
            bytes: match value {
                Value::Str(s) => s.len(),
                _ => 0,
            },
            height: 0,
        }
    }

    /// Adds a child's shape to a collection's running total.
    fn add(&mut self, child: Shape) {
        self.size += child.size;
        self.bytes += child.bytes;
        self.height = self.height.max(child.height);
    }

    /// The shape of a collection whose children added up to `self`.
    fn collection(self) -> Shape {
        Shape {
            size: self.size + 1,
            bytes: self.bytes,
            height: self.height + 1,
        }
    }
}

/// A list or mapping being read: where it opened and what it holds so far.
struct Frame {
    start: usize,
    /// The end of its opening event, then of its last item: where a block collection ends.
    end: usize,
    /// Written as `[...]` or `{...}`: it ends at its closing bracket instead.
    flow: bool,
    anchor: usize,
    children: Shape,
    body: Body,
}

enum Body {
    Seq(Vec<Node>),
    Map {
        map: Map,
        /// The keys, once the mapping is large enough that scanning for duplicates is slow.
        seen: HashSet<String>,
        /// The key read, waiting for its value.
        key: Option<PendingKey>,
        /// The values of `<<` keys, merged in when the mapping closes.
        merges: Vec<Node>,
    },
}

struct PendingKey {
    name: String,
    span: SourceSpan,
    merge: bool,
}

struct Builder<'t> {
    text: &'t str,
    offsets: Offsets,
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Node, Shape)>,
    root: Option<Node>,
    problems: Vec<Problem>,
    /// Values and string bytes copied by aliases so far, against [`MAX_ALIAS_NODES`] and
    /// [`MAX_ALIAS_BYTES`].
    alias_nodes: usize,
    alias_bytes: usize,
    /// Documents started so far: a manifest is one.
    documents: usize,
    /// A limit was crossed (or a second document began): stop reading at once.
    stop: bool,
}

/// Parses one YAML document that starts at global offset `base`. An empty document is
/// `Null`. Syntax errors, duplicate keys and unsupported constructs are all reported.
pub fn parse(text: &str, base: usize) -> Result<Node, Vec<Problem>> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(vec![too_large(text, base, text.len() as u64)]);
    }
    let mut b = Builder::new(text, base);
    for item in Parser::new_from_str(text) {
        if b.stop {
            return Err(b.problems);
        }
        let (event, yspan) = match item {
            Ok(e) => e,
            Err(err) => {
                let at = b.offsets.at(err.marker().index());
                b.problems.push(syntax_problem(err.info(), at, text, base));
                return Err(b.problems);
            }
        };
        let span = b.offsets.span(&yspan);
        b.event(event, span);
    }
    if !b.problems.is_empty() {
        return Err(b.problems);
    }
    Ok(b.root
        .unwrap_or_else(|| Node::new(span_between(base, base), Value::Null)))
}

/// A text of `total` bytes, over [`MAX_TEXT_BYTES`], located where the limit is crossed
/// (`text` may hold only its first [`MAX_TEXT_BYTES`]).
pub fn too_large(text: &str, base: usize, total: u64) -> Problem {
    let mut at = MAX_TEXT_BYTES.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    Problem::new(format!(
        "this text is {total} bytes; manifests are limited to {} MiB",
        MAX_TEXT_BYTES >> 20
    ))
    .at(
        span_between(base + at, base + at),
        "the limit is reached here",
    )
    .help(
        "a manifest describes a pipeline, not its data: keep large lists and texts in files \
         and wire them in with `file:` inputs",
    )
}

fn syntax_problem(info: &str, at: usize, text: &str, base: usize) -> Problem {
    let local = at - base;
    let line_start = text[..local.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let tab_indent = text[line_start..].starts_with('\t');
    let help = if tab_indent {
        "YAML indentation must use spaces, not tabs"
    } else if info.contains("mapping values are not allowed") {
        "a `key: value` appears where it cannot: check the indentation of this line, or quote a value that contains `: `"
    } else if info.contains("did not find expected") {
        "check the indentation and that every `[`, `{` and quote is closed"
    } else {
        "check the indentation and quoting around this place"
    };
    Problem::new(format!("YAML syntax error: {info}"))
        .at(span_between(at, at), "here")
        .help(help)
}

impl<'t> Builder<'t> {
    fn new(text: &'t str, base: usize) -> Self {
        Builder {
            text,
            offsets: Offsets::new(text, base),
            stack: Vec::new(),
            anchors: HashMap::new(),
            root: None,
            problems: Vec::new(),
            alias_nodes: 0,
            alias_bytes: 0,
            documents: 0,
            stop: false,
        }
    }

    /// Feeds one parser event, located at `span`, into the tree being built.
    fn event(&mut self, event: Event<'_>, span: SourceSpan) {
        match event {
            Event::DocumentStart(_) => self.document_start(span),
            Event::Scalar(value, style, anchor, tag) => {
                self.scalar(value, style, anchor, tag, span);
            }
            Event::Alias(id) => self.alias(id, span),
            Event::SequenceStart(anchor, tag) => {
                self.open(anchor, tag, span, Body::Seq(Vec::new()))
            }
            Event::MappingStart(anchor, tag) => {
                let body = Body::Map {
                    map: Map::default(),
                    seen: HashSet::new(),
                    key: None,
                    merges: Vec::new(),
                };
                self.open(anchor, tag, span, body);
            }
            Event::SequenceEnd | Event::MappingEnd => self.close(span),
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
    }

    /// Counts documents; the second one is an error that stops the parse.
    fn document_start(&mut self, span: SourceSpan) {
        self.documents += 1;
        if self.documents > 1 {
            self.problems.push(
                Problem::new("a manifest is one YAML document, but this file has several")
                    .at(span, "a second document starts here")
                    .help("remove the `---` line, or split the file into separate manifests"),
            );
            self.stop = true;
        }
    }

    /// Opens a list or mapping: checks its tag and depth, and pushes its frame.
    fn open(&mut self, anchor: usize, tag: Option<Cow<'_, Tag>>, span: SourceSpan, body: Body) {
        let (expected, bracket) = match body {
            Body::Seq(_) => ("seq", b'['),
            Body::Map { .. } => ("map", b'{'),
        };
        self.collection_tag(tag.as_deref(), expected, span);
        self.check_depth(1, span);
        let flow = self.starts_with(span, bracket);
        self.stack.push(Frame {
            start: span.offset,
            end: span_end(span),
            flow,
            anchor,
            children: Shape::default(),
            body,
        });
    }

    /// Closes the open list or mapping, applying a mapping's merge keys. A block collection
    /// ends at its last item; a flow one at its closing bracket, `span`.
    fn close(&mut self, span: SourceSpan) {
        let Some(frame) = self.stack.pop() else {
            return;
        };
        let end = if frame.flow {
            span_end(span)
        } else {
            frame.end
        };
        let value = match frame.body {
            Body::Seq(items) => Value::Seq(items),
            Body::Map {
                mut map, merges, ..
            } => {
                self.apply_merges(&mut map, merges);
                Value::Map(map)
            }
        };
        self.complete(
            Node::new(span_between(frame.start, end), value),
            frame.anchor,
            frame.children.collection(),
        );
    }

    fn starts_with(&self, span: SourceSpan, byte: u8) -> bool {
        self.text.as_bytes().get(span.offset - self.offsets.base) == Some(&byte)
    }

    fn awaiting_key(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Frame {
                body: Body::Map { key: None, .. },
                ..
            })
        )
    }

    fn scalar(
        &mut self,
        value: Cow<'_, str>,
        style: ScalarStyle,
        anchor: usize,
        tag: Option<Cow<'_, Tag>>,
        span: SourceSpan,
    ) {
        if self.awaiting_key() {
            let merge = style == ScalarStyle::Plain && value == "<<";
            if anchor != 0 {
                let node = Node::new(span, Value::Str(value.to_string()));
                let shape = Shape::scalar(&node.value);
                self.anchors.insert(anchor, (node, shape));
            }
            if let Some(Frame {
                body: Body::Map { key, .. },
                ..
            }) = self.stack.last_mut()
            {
                *key = Some(PendingKey {
                    name: value.into_owned(),
                    span,
                    merge,
                });
            }
            return;
        }
        let node = match self.resolve_scalar(&value, style, tag.as_deref(), span) {
            Ok(v) => {
                let mut node = Node::new(span, v);
                if let Value::Str(s) = &node.value {
                    node.text_start = self.verbatim_start(s, style, span);
                }
                node
            }
            Err(p) => {
                self.problems.push(p);
                Node::new(span, Value::Null)
            }
        };
        let shape = Shape::scalar(&node.value);
        self.complete(node, anchor, shape);
    }

    /// Where a string's characters start in the source, when they map one-to-one onto it.
    fn verbatim_start(&self, s: &str, style: ScalarStyle, span: SourceSpan) -> Option<usize> {
        let local = span.offset - self.offsets.base;
        let raw = self.text.get(local..local + span.len)?;
        match style {
            ScalarStyle::Plain => (raw == s).then_some(span.offset),
            ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted => {
                (raw.len() >= 2 && &raw[1..raw.len() - 1] == s).then_some(span.offset + 1)
            }
            _ => None,
        }
    }

    fn resolve_scalar(
        &self,
        v: &str,
        style: ScalarStyle,
        tag: Option<&Tag>,
        span: SourceSpan,
    ) -> Result<Value, Problem> {
        let Some(tag) = tag else {
            return Ok(if style == ScalarStyle::Plain {
                resolve_plain(v)
            } else {
                Value::Str(v.to_string())
            });
        };
        let bad = |what: &str| {
            Problem::new(format!("`{v}` is not a valid {what}"))
                .at(span, format!("tagged {tag}"))
                .help("remove the tag or fix the value")
        };
        if !tag.is_yaml_core_schema() {
            if tag.handle == "!" && tag.suffix.is_empty() {
                return Ok(Value::Str(v.to_string()));
            }
            return Err(unsupported_tag(tag, span));
        }
        match tag.suffix.as_str() {
            "str" => Ok(Value::Str(v.to_string())),
            "null" => Ok(Value::Null),
            "bool" => match resolve_plain(v) {
                b @ Value::Bool(_) => Ok(b),
                _ => Err(bad("boolean")),
            },
            "int" => match resolve_plain(v) {
                i @ Value::Int(_) => Ok(i),
                _ => Err(bad("integer")),
            },
            "float" => match resolve_plain(v) {
                Value::Int(i) => Ok(Value::Float(i as f64)),
                f @ Value::Float(_) => Ok(f),
                _ => Err(bad("float")),
            },
            _ => Err(unsupported_tag(tag, span)),
        }
    }

    fn collection_tag(&mut self, tag: Option<&Tag>, expected: &str, span: SourceSpan) {
        if let Some(tag) = tag {
            if !(tag.is_yaml_core_schema() && tag.suffix == expected) {
                self.problems.push(unsupported_tag(tag, span));
            }
        }
    }

    fn alias(&mut self, id: usize, span: SourceSpan) {
        if self.awaiting_key() {
            self.problems.push(
                Problem::new("an alias cannot be used as a mapping key")
                    .at(span, "alias used as a key")
                    .help("write the key out"),
            );
            // Keep the structure consistent: treat it as a key nobody can match.
            if let Some(Frame {
                body: Body::Map { key, .. },
                ..
            }) = self.stack.last_mut()
            {
                *key = Some(PendingKey {
                    name: String::new(),
                    span,
                    merge: false,
                });
            }
            return;
        }
        let Some(&(_, shape)) = self.anchors.get(&id) else {
            self.problems.push(
                Problem::new("alias to an unknown anchor")
                    .at(span, "no anchor of this name before here"),
            );
            self.complete(Node::new(span, Value::Null), 0, Shape::scalar(&Value::Null));
            return;
        };
        // Checked before copying: the copy is what would exhaust memory.
        if self.alias_nodes + shape.size > MAX_ALIAS_NODES
            || self.alias_bytes + shape.bytes > MAX_ALIAS_BYTES
        {
            self.problems.push(
                Problem::new(format!(
                    "aliases in this manifest copy more than {MAX_ALIAS_NODES} values or {} MiB \
                     of text in all",
                    MAX_ALIAS_BYTES >> 20
                ))
                .at(
                    span,
                    format!(
                        "this alias would copy {} more values ({} bytes of text), after {} ({} bytes)",
                        shape.size, shape.bytes, self.alias_nodes, self.alias_bytes
                    ),
                )
                .help(
                    "each `*alias` copies its anchor's whole value, so aliases of aliases grow \
                     exponentially (a \"billion laughs\"); write the repeated part once as a \
                     param and refer to it with `${...}`, or copy less of it",
                ),
            );
            self.stop = true;
            return;
        }
        if !self.check_depth(shape.height, span) {
            return;
        }
        self.alias_nodes += shape.size;
        self.alias_bytes += shape.bytes;
        let Some((anchored, _)) = self.anchors.get(&id) else {
            return;
        };
        let node = Node {
            span,
            ..anchored.clone()
        };
        self.complete(node, 0, shape);
    }

    /// Whether `height` more levels of collections fit below the open ones; if not, reports
    /// it at `span` and stops the parse.
    fn check_depth(&mut self, height: usize, span: SourceSpan) -> bool {
        let depth = self.stack.len() + height;
        if depth <= MAX_DEPTH {
            return true;
        }
        self.problems.push(
            Problem::new(format!(
                "lists and mappings nest {depth} deep here; the limit is {MAX_DEPTH}"
            ))
            .at(span, format!("level {depth}"))
            .help(
                "a manifest this deep is almost always generated by mistake (or an alias copies \
                 a value into itself); flatten the structure",
            ),
        );
        self.stop = true;
        false
    }

    fn complete(&mut self, node: Node, anchor: usize, shape: Shape) {
        if anchor != 0 {
            self.anchors.insert(anchor, (node.clone(), shape));
        }
        let node_end = span_end(node.span);
        let Some(frame) = self.stack.last_mut() else {
            self.root = Some(node);
            return;
        };
        frame.end = frame.end.max(node_end);
        frame.children.add(shape);
        match &mut frame.body {
            Body::Seq(items) => items.push(node),
            Body::Map {
                map,
                seen,
                key,
                merges,
            } => {
                frame.children.bytes += key.as_ref().map_or(0, |k| k.name.len());
                match key.take() {
                    None => self.problems.push(
                        Problem::new("a mapping key must be a plain value, not a list or mapping")
                            .at(node.span, "complex key")
                            .help("use a string as the key"),
                    ),
                    Some(k) if k.merge => merges.push(node),
                    Some(k) => {
                        if let Err(p) = insert_entry(map, seen, k, node) {
                            self.problems.push(p);
                        }
                    }
                }
            }
        }
    }

    fn apply_merges(&mut self, map: &mut Map, merges: Vec<Node>) {
        if merges.is_empty() {
            return;
        }
        // Keys present so far, so that merging a large mapping is not a scan per key.
        let mut present: HashSet<String> = map.entries.iter().map(|e| e.key.clone()).collect();
        for merge in merges {
            let sources: Vec<Node> = match merge.value {
                Value::Map(_) => vec![merge],
                Value::Seq(items) => items,
                _ => {
                    self.problems.push(
                        Problem::new("a merge key `<<` takes a mapping or a list of mappings")
                            .at_type_of(&merge)
                            .help("write `<<: *anchor` where `anchor` names a mapping"),
                    );
                    continue;
                }
            };
            for source in sources {
                match source.value {
                    Value::Map(m) => {
                        for e in m.entries {
                            if present.insert(e.key.clone()) {
                                map.entries.push(e);
                            }
                        }
                    }
                    _ => self.problems.push(
                        Problem::new("a merge key `<<` takes a mapping or a list of mappings")
                            .at_type_of(&source),
                    ),
                }
            }
        }
    }
}

/// Adds `key: value` to a mapping being read; a key already there is an error located at
/// both. `seen` is filled only once `map` is large.
fn insert_entry(
    map: &mut Map,
    seen: &mut HashSet<String>,
    key: PendingKey,
    value: Node,
) -> Result<(), Problem> {
    // Small maps (almost all) are scanned; large ones get a set of keys.
    let fresh = if map.entries.len() < 16 {
        map.entries.iter().all(|e| e.key != key.name)
    } else {
        if seen.is_empty() {
            seen.extend(map.entries.iter().map(|e| e.key.clone()));
        }
        seen.insert(key.name.clone())
    };
    if !fresh {
        let first = map.entry(&key.name).map(|e| e.key_span);
        let mut p = Problem::new(format!(
            "key `{}` appears twice in the same mapping",
            key.name
        ))
        .at(key.span, "duplicate key");
        if let Some(first) = first {
            p = p.at(first, "first written here");
        }
        return Err(p.help("remove one of them; YAML keeps no duplicate keys"));
    }
    map.entries.push(Entry {
        key: key.name,
        key_span: key.span,
        value,
    });
    Ok(())
}

fn unsupported_tag(tag: &Tag, span: SourceSpan) -> Problem {
    Problem::new(format!("YAML tag `{tag}` is not supported here"))
        .at(span, "unsupported tag")
        .help("manifests use plain YAML values; remove the tag (core tags like `!!str` are allowed on scalars)")
}

/// A plain scalar's type under the YAML 1.2 core schema.
pub fn resolve_plain(v: &str) -> Value {
    match v {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    if let Some(hex) = v.strip_prefix("0x") {
        if !hex.is_empty() && hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            if let Ok(i) = i64::from_str_radix(hex, 16) {
                return Value::Int(i);
            }
        }
    }
    if let Some(oct) = v.strip_prefix("0o") {
        if !oct.is_empty() && oct.bytes().all(|c| (b'0'..=b'7').contains(&c)) {
            if let Ok(i) = i64::from_str_radix(oct, 8) {
                return Value::Int(i);
            }
        }
    }
    let digits = v.strip_prefix(['-', '+']).unwrap_or(v);
    if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) {
        return match v.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => v
                .parse::<f64>()
                .map_or_else(|_| Value::Str(v.to_string()), Value::Float),
        };
    }
    if is_core_float(digits) {
        if let Ok(f) = v.parse::<f64>() {
            return Value::Float(f);
        }
    }
    Value::Str(v.to_string())
}

/// `( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?` (sign already removed).
fn is_core_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let int_digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    i += int_digits;
    let mut frac_digits = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        frac_digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        i += frac_digits;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let exp = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if exp == 0 {
            return false;
        }
        i += exp;
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Node {
        parse(text, 0).unwrap()
    }

    fn slice<'a>(text: &'a str, n: &Node) -> &'a str {
        &text[n.span.offset..n.span.offset + n.span.len]
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        assert_eq!(resolve_plain("1"), Value::Int(1));
        assert_eq!(resolve_plain("-3"), Value::Int(-3));
        assert_eq!(resolve_plain("1.0e-4"), Value::Float(1.0e-4));
        assert_eq!(resolve_plain("2e-4"), Value::Float(2e-4));
        assert_eq!(resolve_plain(".5"), Value::Float(0.5));
        assert_eq!(resolve_plain("yes"), Value::Str("yes".into()));
        assert_eq!(resolve_plain("1.2.3"), Value::Str("1.2.3".into()));
        assert_eq!(resolve_plain("0x1F"), Value::Int(31));
        assert_eq!(resolve_plain("~"), Value::Null);
        assert_eq!(resolve_plain("e5"), Value::Str("e5".into()));
    }

    #[test]
    fn spans_point_at_keys_and_values_including_after_unicode() {
        let text = "name: héllo\nstages:\n  a:\n    kind: \"x\"\n";
        let root = p(text);
        let m = root.as_map().unwrap();
        assert_eq!(slice(text, m.get("name").unwrap()), "héllo");
        let a = m
            .get("stages")
            .unwrap()
            .as_map()
            .unwrap()
            .entry("a")
            .unwrap();
        assert_eq!(
            &text[a.key_span.offset..a.key_span.offset + a.key_span.len],
            "a"
        );
        let kind = a.value.as_map().unwrap().get("kind").unwrap();
        assert_eq!(slice(text, kind), "\"x\"");
        assert_eq!(kind.text_start, Some(kind.span.offset + 1));
    }

    #[test]
    fn anchors_aliases_and_merge_keys() {
        let text = "base: &b {lr: 1, steps: 2}\nrun:\n  <<: *b\n  lr: 3\nlist: [*b]\n";
        let root = p(text);
        let m = root.as_map().unwrap();
        let run = m.get("run").unwrap().as_map().unwrap();
        assert_eq!(run.keys().collect::<Vec<_>>(), ["lr", "steps"]);
        assert_eq!(run.get("lr").unwrap().value, Value::Int(3));
        assert_eq!(run.get("steps").unwrap().value, Value::Int(2));
        let Value::Seq(items) = &m.get("list").unwrap().value else {
            panic!()
        };
        assert_eq!(slice(text, &items[0]), "*b");
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_are_located() {
        let errs = parse("a: 1\nb: 2\na: 3\n", 0).unwrap_err();
        assert_eq!(errs[0].span().unwrap().offset, 10);
        let errs = parse("a: [1, 2\nb: 3\n", 0).unwrap_err();
        assert!(
            errs[0].message.starts_with("YAML syntax error"),
            "{:?}",
            errs
        );
    }

    #[test]
    fn core_tags_are_honoured() {
        let root = p("a: !!str 1\nb: !!float 2\n");
        let m = root.as_map().unwrap();
        assert_eq!(m.get("a").unwrap().value, Value::Str("1".into()));
        assert_eq!(m.get("b").unwrap().value, Value::Float(2.0));
        assert!(parse("a: !custom 1\n", 0).is_err());
    }
}
