//! Field paths into a record: `id`, `messages.0.content`, `messages.-1.content`.
//!
//! Dots separate steps; a step into a list is an index, negative from the end (`-1` is the
//! last message). An absent key or an index past the end is *missing* (the filter's
//! `if_missing` decides what that means); stepping into a value of the wrong shape (an index
//! on an object, a key on a string) is an error, because it means the path itself is wrong.

use std::fmt;

use serde_json::Value;

use crate::formats::jsonl::json_kind;

#[derive(Clone, Debug, PartialEq)]
pub struct FieldPath {
    text: String,
    steps: Vec<String>,
}

impl FieldPath {
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        if text.is_empty() {
            return Err("empty field path".to_string());
        }
        let steps: Vec<String> = text.split('.').map(str::to_string).collect();
        if steps.iter().any(String::is_empty) {
            return Err(format!(
                "field path `{text}` has an empty step (two dots, or a dot at an end)"
            ));
        }
        Ok(FieldPath {
            text: text.to_string(),
            steps,
        })
    }

    /// The value at this path: `Ok(None)` when a key or index is absent, `Err` when the
    /// record's shape does not fit the path.
    pub fn resolve<'v>(
        &self,
        record: &'v serde_json::Map<String, Value>,
    ) -> Result<Option<&'v Value>, String> {
        let Some(first) = record.get(&self.steps[0]) else {
            return Ok(None);
        };
        let mut current = first;
        for (depth, step) in self.steps.iter().enumerate().skip(1) {
            let walked = self.steps[..depth].join(".");
            current = match current {
                Value::Object(map) => match map.get(step) {
                    Some(v) => v,
                    None => return Ok(None),
                },
                Value::Array(items) => {
                    let index: i64 = step.parse().map_err(|_| {
                        format!("`{walked}` is a list, so the next step of `{}` must be an index, not `{step}`", self.text)
                    })?;
                    let resolved = if index < 0 {
                        items.len() as i64 + index
                    } else {
                        index
                    };
                    match usize::try_from(resolved).ok().and_then(|i| items.get(i)) {
                        Some(v) => v,
                        None => return Ok(None),
                    }
                }
                other => {
                    return Err(format!(
                        "`{walked}` is {}, so `{}` cannot step into it",
                        json_kind(other),
                        self.text
                    ))
                }
            };
        }
        Ok(Some(current))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> serde_json::Map<String, Value> {
        match json!({"id": "q", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn indices_count_from_either_end() {
        let r = record();
        let at = |p: &str| FieldPath::parse(p).unwrap().resolve(&r).unwrap().cloned();
        assert_eq!(at("messages.0.content"), Some(json!("a")));
        assert_eq!(at("messages.-1.content"), Some(json!("b")));
        assert_eq!(at("messages.2.content"), None);
        assert_eq!(at("messages.-3.content"), None);
        assert_eq!(at("missing.x"), None);
    }

    #[test]
    fn shape_mismatches_are_errors() {
        let r = record();
        let e = FieldPath::parse("messages.user.content")
            .unwrap()
            .resolve(&r)
            .unwrap_err();
        assert!(e.contains("must be an index, not `user`"), "{e}");
        let e = FieldPath::parse("id.x").unwrap().resolve(&r).unwrap_err();
        assert!(e.contains("`id` is a string"), "{e}");
        assert!(FieldPath::parse("a..b").is_err());
    }
}
