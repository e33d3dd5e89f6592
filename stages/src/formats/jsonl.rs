//! JSONL in and out: one JSON object a line.
//!
//! Reading skips blank lines (a trailing newline or an empty last line is common in
//! hand-edited files) but keeps the true line numbers for messages. Writing emits exactly
//! one compact object per line, each ended by `\n`, with no trailing blank line.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Location, Position};

/// Reads every non-blank line of `path` as a JSON object. `display` names the file in
/// errors (pass the path itself, or a stage output name when the file lives in the store).
///
/// Errors name the line: `train.jsonl:17: invalid JSON: ...`.
pub fn read_objects(
    path: &Path,
    display: &str,
) -> anyhow::Result<Vec<(Location, Map<String, Value>)>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read {display} ({})", path.display()))?;
    parse_objects(&text, display)
}

/// [`read_objects`] on text already in memory.
pub fn parse_objects(
    text: &str,
    display: &str,
) -> anyhow::Result<Vec<(Location, Map<String, Value>)>> {
    let file: Arc<str> = Arc::from(display);
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}');
        if line.trim().is_empty() {
            continue;
        }
        let location = Location {
            file: file.clone(),
            at: Position::Line(index + 1),
        };
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => records.push((location, map)),
            Ok(other) => bail!(
                "{location}: expected a JSON object, found {}",
                json_kind(&other)
            ),
            Err(e) => bail!("{location}: invalid JSON: {e}"),
        }
    }
    Ok(records)
}

/// Writes `records` to `path` as JSONL: one compact JSON value a line, `\n` endings.
/// Key order is whatever the records serialise to; the format modules' types fix it.
pub fn write<T: Serialize>(
    path: &Path,
    records: impl IntoIterator<Item = T>,
) -> anyhow::Result<()> {
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for record in records {
        serde_json::to_writer(&mut out, &record)
            .with_context(|| format!("cannot write {}", path.display()))?;
        out.write_all(b"\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A short name for a JSON value's type, for error messages.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_lines_are_skipped_but_line_numbers_kept() {
        let records = parse_objects("{\"a\":1}\n\n{\"b\":2}\n", "x.jsonl").unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].0.to_string(), "x.jsonl:3");
    }

    #[test]
    fn errors_name_file_and_line() {
        let err = parse_objects("{\"a\":1}\n[1]\n", "x.jsonl").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.jsonl:2: expected a JSON object, found a list"
        );
        let err = parse_objects("{\"a\":1}\n{oops\n", "x.jsonl").unwrap_err();
        assert!(
            err.to_string().starts_with("x.jsonl:2: invalid JSON"),
            "{err}"
        );
    }
}
