//! The dataset kind's operations: parsed from the `ops` param, applied to rows in order.
//!
//! Each op is a one-key mapping (`- take: 16`, `- shuffle: {seed: 0}`). Parsing is by hand
//! rather than through serde so that every mistake names its place (`ops.2.filter.regex`)
//! and says what was expected; the engine turns that place into a manifest line and column.
//! Ops that would need more rows than they get fail instead of quietly returning fewer:
//! `take: 500` on 300 rows is almost always a wrong file or a wrong op order.

use std::collections::HashSet;

use anyhow::{bail, Context as _};
use regex::Regex;
use serde_json::{Map, Value};

use super::derive::{self, MarkSplit, Template};
use super::path::FieldPath;
use super::seeded::permutation;
use super::Format;
use crate::formats::jsonl::json_kind;
use crate::formats::{Conversation, Location, Message, Question};

/// One record on its way through the ops, with where it was read from.
#[derive(Clone, Debug)]
pub struct Row {
    pub location: Location,
    pub record: Map<String, Value>,
}

#[derive(Clone, Debug)]
pub enum Op {
    Select(Vec<String>),
    Filter(Filter),
    Shuffle { seed: u64 },
    Sample { n: usize, seed: u64 },
    Take(usize),
    Skip(usize),
    Split { test: f64, seed: u64, part: Part },
    Dedupe { by: Option<FieldPath> },
    SystemPrompt(String),
    AppendUser(String),
    StripAssistantPrefix(String),
    StripUserSuffix(String),
    DropRole(String),
    Number { field: String, prefix: String },
    MarkSplit(MarkSplit),
    TemplateReply { seed: u64 },
    ToQuestions { id: FieldPath },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Train,
    Test,
}

#[derive(Clone, Debug)]
pub struct Filter {
    field: FieldPath,
    tests: Vec<Test>,
    negate: bool,
    if_missing: Missing,
}

#[derive(Clone, Debug)]
enum Test {
    Contains(String),
    Regex(Regex),
    MinWords(usize),
    MaxWords(usize),
    Equals(Value),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Missing {
    Error,
    Drop,
    Keep,
}

/// A parse error: `at` is a dotted path below the op (empty for the op itself).
#[derive(Debug)]
pub struct OpError {
    pub at: String,
    pub message: String,
    pub hint: Option<String>,
}

const OP_NAMES: &[&str] = &[
    "select",
    "filter",
    "shuffle",
    "sample",
    "take",
    "skip",
    "split",
    "dedupe",
    "system_prompt",
    "append_user",
    "strip_assistant_prefix",
    "strip_user_suffix",
    "drop_role",
    "number",
    "mark_split",
    "template_reply",
    "to_questions",
];

fn err(at: &str, message: impl Into<String>) -> OpError {
    OpError {
        at: at.to_string(),
        message: message.into(),
        hint: None,
    }
}

impl Op {
    /// Parses one entry of the `ops` list.
    pub fn parse(value: &Value) -> Result<Op, OpError> {
        let Value::Object(map) = value else {
            return Err(OpError {
                at: String::new(),
                message: format!("an op is a one-key mapping, found {}", json_kind(value)),
                hint: Some("write e.g. `- take: 16` or `- shuffle: {seed: 0}`".to_string()),
            });
        };
        let mut entries = map.iter();
        let (name, arg) = match (entries.next(), entries.next()) {
            (Some(entry), None) => entry,
            _ => {
                return Err(OpError {
                    at: String::new(),
                    message: format!(
                        "an op is a mapping with exactly one key, found {} keys",
                        map.len()
                    ),
                    hint: Some("put each op in its own list item".to_string()),
                })
            }
        };
        let at = name.as_str();
        let op = match at {
            "select" => Op::Select(parse_select(arg, at)?),
            "filter" => Op::Filter(parse_filter(arg, at)?),
            "shuffle" => {
                let args = Args::new(arg, at, &["seed"])?;
                Op::Shuffle {
                    seed: args.u64("seed")?,
                }
            }
            "sample" => {
                let args = Args::new(arg, at, &["n", "seed"])?;
                Op::Sample {
                    n: args.count("n")?,
                    seed: args.u64("seed")?,
                }
            }
            "take" => Op::Take(count(arg, at)?),
            "skip" => Op::Skip(count(arg, at)?),
            "split" => {
                let args = Args::new(arg, at, &["test", "seed", "part"])?;
                let test = args.fraction("test")?;
                let part = match args.string("part")?.as_str() {
                    "train" => Part::Train,
                    "test" => Part::Test,
                    other => {
                        return Err(err(
                            &format!("{at}.part"),
                            format!("`{other}` is not a part: use train or test"),
                        ))
                    }
                };
                Op::Split {
                    test,
                    seed: args.u64("seed")?,
                    part,
                }
            }
            "dedupe" => {
                let args = Args::new(arg, at, &["by"])?;
                let by = match args.optional("by") {
                    None => None,
                    Some(_) => Some(path(&args.string("by")?, &format!("{at}.by"))?),
                };
                Op::Dedupe { by }
            }
            "system_prompt" => Op::SystemPrompt(text(arg, at)?),
            "append_user" => Op::AppendUser(text(arg, at)?),
            "strip_assistant_prefix" => Op::StripAssistantPrefix(nonempty_text(arg, at)?),
            "strip_user_suffix" => Op::StripUserSuffix(nonempty_text(arg, at)?),
            "drop_role" => Op::DropRole(nonempty_text(arg, at)?),
            "number" => {
                let (field, prefix) = derive::parse_number(arg, at)?;
                Op::Number { field, prefix }
            }
            "mark_split" => Op::MarkSplit(derive::parse_mark_split(arg, at)?),
            "template_reply" => {
                let args = Args::new(arg, at, &["seed"])?;
                Op::TemplateReply {
                    seed: args.u64("seed")?,
                }
            }
            "to_questions" => {
                let args = Args::new(arg, at, &["id"])?;
                Op::ToQuestions {
                    id: args.path("id")?,
                }
            }
            other => {
                return Err(OpError {
                    at: String::new(),
                    message: format!("unknown op `{other}`"),
                    hint: Some(format!("ops are: {}", OP_NAMES.join(", "))),
                })
            }
        };
        Ok(op)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Select(_) => "select",
            Op::Filter(_) => "filter",
            Op::Shuffle { .. } => "shuffle",
            Op::Sample { .. } => "sample",
            Op::Take(_) => "take",
            Op::Skip(_) => "skip",
            Op::Split { .. } => "split",
            Op::Dedupe { .. } => "dedupe",
            Op::SystemPrompt(_) => "system_prompt",
            Op::AppendUser(_) => "append_user",
            Op::StripAssistantPrefix(_) => "strip_assistant_prefix",
            Op::StripUserSuffix(_) => "strip_user_suffix",
            Op::DropRole(_) => "drop_role",
            Op::Number { .. } => "number",
            Op::MarkSplit(_) => "mark_split",
            Op::TemplateReply { .. } => "template_reply",
            Op::ToQuestions { .. } => "to_questions",
        }
    }

    /// Why this op cannot apply to records of `format`, if it cannot.
    pub fn unfit_for(&self, format: Format) -> Option<&'static str> {
        match (self, format) {
            (Op::StripAssistantPrefix(_), Format::Questions) => Some(
                "questions have no assistant turns; strip_assistant_prefix applies to messages",
            ),
            (Op::DropRole(_), Format::Questions) => {
                Some("questions have no turns to drop; drop_role applies to messages")
            }
            (Op::MarkSplit(_), Format::Questions) => Some(
                "questions take no extra fields to record a split in; mark_split applies to messages",
            ),
            (Op::TemplateReply { .. }, Format::Questions) => {
                Some("questions have no turns to reply to; template_reply applies to messages")
            }
            (Op::ToQuestions { .. }, Format::Questions) => {
                Some("the rows are questions already; to_questions turns messages into questions")
            }
            _ => None,
        }
    }

    /// The format of the rows this op returns when given rows of `format`.
    pub fn format_after(&self, format: Format) -> Format {
        match self {
            Op::ToQuestions { .. } => Format::Questions,
            _ => format,
        }
    }

    /// Applies the op. `template` is the stage's `template` input, if wired; `note` receives
    /// remarks worth a log line (e.g. a strip that matched no row). Errors name the row they
    /// concern.
    pub fn apply(
        &self,
        rows: Vec<Row>,
        format: Format,
        template: Option<&Template>,
        note: &mut dyn FnMut(String),
    ) -> anyhow::Result<Vec<Row>> {
        if let Some(why) = self.unfit_for(format) {
            bail!("{why}");
        }
        let available = rows.len();
        let need = |n: usize, what: &str| -> anyhow::Result<()> {
            if n > available {
                bail!("{what} needs {n} rows but only {available} reach it; lower the number or check the sources and earlier ops");
            }
            Ok(())
        };
        Ok(match self {
            Op::Select(fields) => rows
                .into_iter()
                .map(|mut row| {
                    row.record.retain(|key, _| fields.iter().any(|f| f == key));
                    row
                })
                .collect(),
            Op::Filter(filter) => filter_rows(rows, filter)?,
            Op::Shuffle { seed } => {
                let mut slots: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
                permutation(slots.len(), *seed)
                    .into_iter()
                    .filter_map(|i| slots[i].take())
                    .collect()
            }
            Op::Sample { n, seed } => {
                need(*n, &format!("sample n={n}"))?;
                let mut chosen = permutation(rows.len(), *seed);
                chosen.truncate(*n);
                keep_indices(rows, chosen)
            }
            Op::Take(n) => {
                need(*n, &format!("take {n}"))?;
                rows.into_iter().take(*n).collect()
            }
            Op::Skip(n) => {
                need(*n, &format!("skip {n}"))?;
                rows.into_iter().skip(*n).collect()
            }
            Op::Split { test, seed, part } => {
                let order = permutation(rows.len(), *seed);
                let n_test = (rows.len() as f64 * test).round() as usize;
                let (test_rows, train_rows) = order.split_at(n_test);
                let chosen = match part {
                    Part::Test => test_rows.to_vec(),
                    Part::Train => train_rows.to_vec(),
                };
                keep_indices(rows, chosen)
            }
            Op::Dedupe { by } => dedupe(rows, by.as_ref())?,
            Op::Number { field, prefix } => derive::number(rows, field, prefix),
            Op::MarkSplit(split) => derive::mark_split(rows, split, note)?,
            Op::TemplateReply { seed } => derive::template_reply(rows, *seed, template)?,
            Op::ToQuestions { id } => derive::to_questions(rows, id, template)?,
            Op::SystemPrompt(_)
            | Op::AppendUser(_)
            | Op::StripUserSuffix(_)
            | Op::StripAssistantPrefix(_)
            | Op::DropRole(_) => self.edit_text(rows, format, note)?,
        })
    }

    /// Applies a text-editing op (`system_prompt`, `append_user`, `strip_*`, `drop_role`)
    /// to every row.
    fn edit_text(
        &self,
        rows: Vec<Row>,
        format: Format,
        note: &mut dyn FnMut(String),
    ) -> anyhow::Result<Vec<Row>> {
        Ok(match self {
            Op::SystemPrompt(prompt) => {
                edit_rows(rows, format, self.name(), note, |edit| match edit {
                    Edit::Conversation(c) => {
                        match c.messages.first_mut() {
                            Some(first) if first.role == "system" => first.content = prompt.clone(),
                            _ => c.messages.insert(0, Message::new("system", prompt)),
                        }
                        true
                    }
                    Edit::Question(q) => {
                        q.system = Some(prompt.clone());
                        true
                    }
                })?
            }
            Op::AppendUser(suffix) => edit_rows(rows, format, self.name(), note, |edit| {
                for text in user_texts(edit) {
                    text.push_str(suffix);
                }
                true
            })?,
            Op::StripUserSuffix(suffix) => edit_rows(rows, format, self.name(), note, |edit| {
                let mut changed = false;
                for text in user_texts(edit) {
                    if let Some(kept) = text.strip_suffix(suffix.as_str()) {
                        text.truncate(kept.len());
                        changed = true;
                    }
                }
                changed
            })?,
            Op::StripAssistantPrefix(prefix) => {
                edit_rows(rows, format, self.name(), note, |edit| {
                    let mut changed = false;
                    if let Edit::Conversation(c) = edit {
                        for m in c.messages.iter_mut().filter(|m| m.role == "assistant") {
                            if let Some(rest) = m.content.strip_prefix(prefix.as_str()) {
                                m.content = rest.to_string();
                                changed = true;
                            }
                        }
                    }
                    changed
                })?
            }
            Op::DropRole(role) => edit_rows(rows, format, self.name(), note, |edit| match edit {
                Edit::Conversation(c) => {
                    let before = c.messages.len();
                    c.messages.retain(|m| &m.role != role);
                    c.messages.len() != before
                }
                Edit::Question(_) => false,
            })?,
            other => bail!("`{}` is not a text edit", other.name()),
        })
    }
}

impl Op {
    /// The rows an op fails without (`sample`, `take`, `skip`), with the dotted path of that
    /// number below the op (`take`, `sample.n`).
    pub fn needs(&self) -> Option<(usize, &'static str)> {
        match self {
            Op::Sample { n, .. } => Some((*n, "sample.n")),
            Op::Take(n) => Some((*n, "take")),
            Op::Skip(n) => Some((*n, "skip")),
            _ => None,
        }
    }

    /// How many rows leave this op when `rows` reach it, where the count alone decides that:
    /// `None` for `filter` and `dedupe`, which depend on the rows themselves.
    pub fn rows_after(&self, rows: usize) -> Option<usize> {
        match self {
            Op::Filter(_) | Op::Dedupe { .. } => None,
            Op::Sample { n, .. } | Op::Take(n) => Some((*n).min(rows)),
            Op::Skip(n) => Some(rows.saturating_sub(*n)),
            Op::Split { test, part, .. } => {
                let n_test = ((rows as f64 * test).round() as usize).min(rows);
                Some(match part {
                    Part::Test => n_test,
                    Part::Train => rows - n_test,
                })
            }
            Op::Select(_)
            | Op::Shuffle { .. }
            | Op::SystemPrompt(_)
            | Op::AppendUser(_)
            | Op::StripUserSuffix(_)
            | Op::StripAssistantPrefix(_)
            | Op::DropRole(_)
            | Op::Number { .. }
            | Op::MarkSplit(_)
            | Op::TemplateReply { .. }
            | Op::ToQuestions { .. } => Some(rows),
        }
    }
}

/// The rows at `indices`, in their original order.
/// The rows `filter` keeps, in order.
fn filter_rows(rows: Vec<Row>, filter: &Filter) -> anyhow::Result<Vec<Row>> {
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows {
        if filter
            .keeps(&row)
            .with_context(|| format!("{}: filter on `{}`", row.location, filter.field))?
        {
            kept.push(row);
        }
    }
    Ok(kept)
}

/// The first row of each distinct whole record, or of each distinct value at `by`.
fn dedupe(rows: Vec<Row>, by: Option<&FieldPath>) -> anyhow::Result<Vec<Row>> {
    let mut seen = HashSet::new();
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows {
        let key = match by {
            None => serde_json::to_string(&row.record)?,
            Some(path) => match path.resolve(&row.record) {
                Ok(Some(value)) => serde_json::to_string(value)?,
                Ok(None) => bail!("{}: dedupe: the row has no `{path}`", row.location),
                Err(e) => bail!("{}: dedupe: {e}", row.location),
            },
        };
        if seen.insert(key) {
            kept.push(row);
        }
    }
    Ok(kept)
}

fn keep_indices(rows: Vec<Row>, mut indices: Vec<usize>) -> Vec<Row> {
    indices.sort_unstable();
    let mut slots: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
    indices
        .into_iter()
        .filter_map(|i| slots[i].take())
        .collect()
}

enum Edit<'a> {
    Conversation(&'a mut Conversation),
    Question(&'a mut Question),
}

/// The user-turn texts of a record: user messages, or a question's paraphrases.
fn user_texts<'a>(edit: &'a mut Edit<'_>) -> Vec<&'a mut String> {
    match edit {
        Edit::Conversation(c) => c
            .messages
            .iter_mut()
            .filter(|m| m.role == "user")
            .map(|m| &mut m.content)
            .collect(),
        Edit::Question(q) => q.paraphrases.iter_mut().collect(),
    }
}

/// Runs `change` on each row as a typed record; logs a note when it changed no row, which
/// usually means a typo in a prefix or suffix.
fn edit_rows(
    rows: Vec<Row>,
    format: Format,
    op: &str,
    note: &mut dyn FnMut(String),
    mut change: impl FnMut(&mut Edit<'_>) -> bool,
) -> anyhow::Result<Vec<Row>> {
    let total = rows.len();
    let mut changed = 0usize;
    let mut out = Vec::with_capacity(total);
    for mut row in rows {
        let record = std::mem::take(&mut row.record);
        let hint = "an earlier `select` may have dropped a field this op needs";
        row.record = match format {
            Format::Messages => {
                let mut c = Conversation::from_object(record)
                    .with_context(|| format!("{}: {op}: {hint}", row.location))?;
                changed += usize::from(change(&mut Edit::Conversation(&mut c)));
                c.to_object()
            }
            Format::Questions => {
                let mut q = Question::from_object(record)
                    .with_context(|| format!("{}: {op}: {hint}", row.location))?;
                changed += usize::from(change(&mut Edit::Question(&mut q)));
                q.to_object()
            }
        };
        out.push(row);
    }
    if changed == 0 && total > 0 {
        note(format!(
            "{op}: matched none of {total} rows; check the text (whitespace and newlines count)"
        ));
    }
    Ok(out)
}

impl Filter {
    fn keeps(&self, row: &Row) -> anyhow::Result<bool> {
        let value = match self.field.resolve(&row.record) {
            Err(e) => bail!("{e}"),
            Ok(None) => {
                return match self.if_missing {
                    Missing::Error => bail!(
                        "the row has no `{}`; set `if_missing: drop` or `keep` if some rows legitimately lack it",
                        self.field
                    ),
                    Missing::Drop => Ok(false),
                    Missing::Keep => Ok(true),
                }
            }
            Ok(Some(value)) => value,
        };
        let mut pass = true;
        for test in &self.tests {
            pass &= match test {
                Test::Equals(expected) => value == expected,
                Test::Contains(needle) => as_text(value)?.contains(needle.as_str()),
                Test::Regex(re) => re.is_match(as_text(value)?),
                Test::MinWords(n) => as_text(value)?.split_whitespace().count() >= *n,
                Test::MaxWords(n) => as_text(value)?.split_whitespace().count() <= *n,
            };
        }
        Ok(pass != self.negate)
    }
}

fn as_text(value: &Value) -> anyhow::Result<&str> {
    match value {
        Value::String(s) => Ok(s),
        other => bail!(
            "the field is {}, and this test needs text",
            json_kind(other)
        ),
    }
}

fn parse_select(arg: &Value, at: &str) -> Result<Vec<String>, OpError> {
    let Value::Array(items) = arg else {
        return Err(err(
            at,
            format!(
                "select takes a list of field names, found {}",
                json_kind(arg)
            ),
        ));
    };
    let mut fields = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(name) if !name.is_empty() && !name.contains('.') => {
                fields.push(name.clone())
            }
            Value::String(name) => {
                return Err(OpError {
                    at: format!("{at}.{i}"),
                    message: format!("`{name}` is not a top-level field name"),
                    hint: Some(
                        "select keeps whole top-level fields, e.g. `[messages]`".to_string(),
                    ),
                })
            }
            other => {
                return Err(err(
                    &format!("{at}.{i}"),
                    format!("expected a field name, found {}", json_kind(other)),
                ))
            }
        }
    }
    if fields.is_empty() {
        return Err(err(at, "select needs at least one field"));
    }
    Ok(fields)
}

fn parse_filter(arg: &Value, at: &str) -> Result<Filter, OpError> {
    let args = Args::new(
        arg,
        at,
        &[
            "field",
            "contains",
            "regex",
            "min_words",
            "max_words",
            "equals",
            "not",
            "if_missing",
        ],
    )?;
    let field = path(&args.string("field")?, &format!("{at}.field"))?;
    let mut tests = Vec::new();
    if let Some(expected) = args.optional("equals") {
        tests.push(Test::Equals(expected.clone()));
    }
    if args.optional("contains").is_some() {
        tests.push(Test::Contains(args.string("contains")?));
    }
    if args.optional("regex").is_some() {
        let pattern = args.string("regex")?;
        let re = Regex::new(&pattern)
            .map_err(|e| err(&format!("{at}.regex"), format!("invalid regex: {e}")))?;
        tests.push(Test::Regex(re));
    }
    if args.optional("min_words").is_some() {
        tests.push(Test::MinWords(args.count("min_words")?));
    }
    if args.optional("max_words").is_some() {
        tests.push(Test::MaxWords(args.count("max_words")?));
    }
    if tests.is_empty() {
        return Err(OpError {
            at: at.to_string(),
            message: "filter needs a test".to_string(),
            hint: Some(
                "add one or more of: contains, regex, min_words, max_words, equals".to_string(),
            ),
        });
    }
    let negate = match args.optional("not") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(err(
                &format!("{at}.not"),
                format!("expected true or false, found {}", json_kind(other)),
            ))
        }
    };
    let if_missing = match args
        .optional("if_missing")
        .map(|_| args.string("if_missing"))
        .transpose()?
        .as_deref()
    {
        None | Some("error") => Missing::Error,
        Some("drop") => Missing::Drop,
        Some("keep") => Missing::Keep,
        Some(other) => {
            return Err(err(
                &format!("{at}.if_missing"),
                format!("`{other}` is not one of: error, drop, keep"),
            ))
        }
    };
    Ok(Filter {
        field,
        tests,
        negate,
        if_missing,
    })
}

fn path(text: &str, at: &str) -> Result<FieldPath, OpError> {
    FieldPath::parse(text).map_err(|message| err(at, message))
}

fn count(value: &Value, at: &str) -> Result<usize, OpError> {
    let n = match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }),
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
        err(
            at,
            format!("expected a non-negative whole number, found {value}"),
        )
    })
}

fn text(value: &Value, at: &str) -> Result<String, OpError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        other => Err(err(
            at,
            format!("expected text, found {}", json_kind(other)),
        )),
    }
}

fn nonempty_text(value: &Value, at: &str) -> Result<String, OpError> {
    let s = text(value, at)?;
    if s.is_empty() {
        return Err(err(at, "expected non-empty text"));
    }
    Ok(s)
}

/// The mapping argument of an op, with its known keys checked.
pub(super) struct Args<'a> {
    map: &'a Map<String, Value>,
    at: &'a str,
}

impl<'a> Args<'a> {
    pub(super) fn new(value: &'a Value, at: &'a str, known: &[&str]) -> Result<Args<'a>, OpError> {
        let Value::Object(map) = value else {
            return Err(OpError {
                at: at.to_string(),
                message: format!("expected a mapping, found {}", json_kind(value)),
                hint: Some(format!("{at} takes: {}", known.join(", "))),
            });
        };
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(OpError {
                at: format!("{at}.{unknown}"),
                message: format!("unknown key `{unknown}`"),
                hint: Some(format!("{at} takes: {}", known.join(", "))),
            });
        }
        Ok(Args { map, at })
    }

    pub(super) fn optional(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn required(&self, key: &str) -> Result<&'a Value, OpError> {
        self.map
            .get(key)
            .ok_or_else(|| err(self.at, format!("missing `{key}`")))
    }

    fn at(&self, key: &str) -> String {
        format!("{}.{key}", self.at)
    }

    pub(super) fn u64(&self, key: &str) -> Result<u64, OpError> {
        count(self.required(key)?, &self.at(key)).map(|n| n as u64)
    }

    pub(super) fn count(&self, key: &str) -> Result<usize, OpError> {
        count(self.required(key)?, &self.at(key))
    }

    pub(super) fn string(&self, key: &str) -> Result<String, OpError> {
        text(self.required(key)?, &self.at(key))
    }

    /// An error about the value at `key`.
    pub(super) fn error(&self, key: &str, message: &str) -> OpError {
        err(&self.at(key), message)
    }

    /// A dotted field path at `key`.
    pub(super) fn path(&self, key: &str) -> Result<FieldPath, OpError> {
        path(&self.string(key)?, &self.at(key))
    }

    /// A top-level field name at `key` (no dots).
    pub(super) fn field_name(&self, key: &str) -> Result<String, OpError> {
        let name = self.string(key)?;
        if name.is_empty() || name.contains('.') || name == "messages" {
            return Err(self.error(
                key,
                &format!("`{name}` is not a field an op may write: name a new top-level field (no dots, not `messages`)"),
            ));
        }
        Ok(name)
    }

    pub(super) fn fraction(&self, key: &str) -> Result<f64, OpError> {
        match self.required(key)?.as_f64() {
            Some(f) if f > 0.0 && f < 1.0 => Ok(f),
            _ => Err(err(
                &self.at(key),
                "expected a fraction strictly between 0 and 1 (e.g. 0.1)",
            )),
        }
    }
}
