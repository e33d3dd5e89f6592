//! Readers and writers for the record files that flow between stages.
//!
//! Two record formats cross stage boundaries: *messages* ([`messages`]: chat conversations,
//! what `sft` trains on and `rl` prompts with) and *questions* ([`questions`]: evaluation
//! questions with their judge prompts, what `eval` asks). Both are stored as canonical JSONL:
//! one record a line, `\n` line endings, keys in a fixed order, UTF-8 written as is. The same
//! records therefore always give the same bytes and the same content digest, which is what
//! lets a downstream stage stay cached when an upstream rerun yields identical data. Every
//! record file is written by the one writer, [`jsonl::write`]; the record types fix the keys
//! and their order.
//!
//! Contrast sets ([`contrast`]: fixed aligned and misaligned answers per question) are project
//! data read by `eval`, YAML as written by hand; they do not flow between stages.
//!
//! Readers are strict and point at the offending record (`medical.jsonl:17: ...`): a row
//! skipped or reinterpreted in silence would change an experiment without anyone noticing.

pub mod contrast;
pub mod jsonl;
pub mod messages;
pub mod questions;
pub mod rollouts;

use std::fmt;
use std::sync::Arc;

pub use messages::{Conversation, Message};
pub use questions::Question;

/// Where a record came from, for error messages: a file and a line (JSONL) or an entry
/// index (YAML lists, where parsed values carry no line numbers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file as the user knows it: a path, or a stage output such as `sft_data.data`.
    pub file: Arc<str>,
    pub at: Position,
}

/// A record's position inside its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// 1-based line number.
    Line(usize),
    /// 1-based entry number in a top-level YAML list.
    Entry(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Position::Line(n) => write!(f, "{}:{n}", self.file),
            Position::Entry(n) => write!(f, "{}: entry {n}", self.file),
        }
    }
}

/// A JSON value with the keys of every object sorted, recursively. Used for fields whose
/// layout the formats do not fix (extra fields of a record), so that the key order of a
/// source file never reaches the output bytes.
///
/// This orders a value; it is not a second canonical JSON writer. Records are written by
/// serde_json in their format's declared field order, numbers as read (`-0.0` stays `-0.0`).
/// The one canonical writer, `emflow_engine::keys::write_canonical`, serves keys and digests:
/// writing records with it would sort their fixed fields and fold `-0.0` into `0.0`, so every
/// dataset's bytes would change.
pub fn sort_keys_deep(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys_deep(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys_deep).collect()),
        other => other,
    }
}
