//! Chat conversations: `{"messages": [{"role": ..., "content": ...}, ...], ...}` a line.
//!
//! This is the layout of the paper's SFT and RL files (and of most chat datasets), so they
//! are read as they are. Canonical output puts `messages` first and, in each message, `role`
//! before `content`; any other fields are kept, sorted by key. Content must be plain text:
//! multi-part content (images, tool calls) is refused rather than flattened in silence.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use emflow_engine::context::Artifact;

use super::jsonl::{self, json_kind};
use super::{sort_keys_deep, Location};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (any non-empty string is kept as written).
    pub role: String,
    pub content: String,
    /// Other fields of the message object, kept in canonical form.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
            extra: BTreeMap::new(),
        }
    }
}

/// One messages record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// Other top-level fields of the record, kept in canonical form.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Conversation {
    /// Checks that `record` is a messages record and converts it. The error says what is
    /// wrong without a location (callers prefix one): `not a messages record: missing "messages"`.
    pub fn from_object(mut record: Map<String, Value>) -> anyhow::Result<Conversation> {
        let Some(messages) = record.remove("messages") else {
            let keys: Vec<&str> = record.keys().map(String::as_str).collect();
            bail!(
                "not a messages record: missing \"messages\" (fields: {})",
                keys.join(", ")
            );
        };
        let Value::Array(items) = messages else {
            bail!(
                "not a messages record: \"messages\" is {}, not a list",
                json_kind(&messages)
            );
        };
        if items.is_empty() {
            bail!("not a messages record: \"messages\" is empty");
        }
        let messages = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| message_from_value(i, item))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let extra = record
            .into_iter()
            .map(|(k, v)| (k, sort_keys_deep(v)))
            .collect();
        Ok(Conversation { messages, extra })
    }

    /// The record as a JSON object in canonical key order.
    pub fn to_object(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            // A struct of strings and JSON values always serialises to an object.
            _ => unreachable!("a conversation serialises to a JSON object"),
        }
    }

    /// The first message with role `user`, if any.
    pub fn first_user(&self) -> Option<&Message> {
        self.messages.iter().find(|m| m.role == "user")
    }
}

fn message_from_value(index: usize, item: Value) -> anyhow::Result<Message> {
    let Value::Object(mut fields) = item else {
        bail!(
            "not a messages record: messages.{index} is {}, not an object",
            json_kind(&item)
        );
    };
    let role = match fields.remove("role") {
        Some(Value::String(role)) if !role.is_empty() => role,
        Some(other) => bail!(
            "not a messages record: messages.{index}.role is {}, not a role name",
            json_kind(&other)
        ),
        None => bail!("not a messages record: messages.{index} has no \"role\""),
    };
    let content = match fields.remove("content") {
        Some(Value::String(content)) => content,
        Some(other) => bail!(
            "messages.{index}.content is {}; only plain-text content is supported",
            json_kind(&other)
        ),
        None => bail!("not a messages record: messages.{index} has no \"content\""),
    };
    let extra = fields
        .into_iter()
        .map(|(k, v)| (k, sort_keys_deep(v)))
        .collect();
    Ok(Message {
        role,
        content,
        extra,
    })
}

/// Reads a messages JSONL file; `display` names it in errors (`display:LINE: ...`).
pub fn read(path: &Path, display: &str) -> anyhow::Result<Vec<Conversation>> {
    Ok(read_located(path, display)?
        .into_iter()
        .map(|(_, c)| c)
        .collect())
}

/// Like [`read`], keeping each record's location for later error messages.
pub fn read_located(path: &Path, display: &str) -> anyhow::Result<Vec<(Location, Conversation)>> {
    jsonl::read_objects(path, display)?
        .into_iter()
        .map(
            |(location, object)| match Conversation::from_object(object) {
                Ok(conversation) => Ok((location, conversation)),
                Err(e) => bail!("{location}: {e}"),
            },
        )
        .collect()
}

/// Reads a messages input (error names the stage input).
pub fn read_conversations(input: &Artifact) -> anyhow::Result<Vec<Conversation>> {
    let display = input.origin.clone();
    let rows = read(&input.path, &display)?;
    anyhow::ensure!(!rows.is_empty(), "{display} holds no conversations");
    Ok(rows)
}

/// A conversation as the model layer's messages, with `system` (if given) replacing or
/// adding the system turn.
pub fn to_model_messages(conv: &Conversation, system: Option<&str>) -> Vec<emflow_model::Message> {
    let mut out: Vec<emflow_model::Message> = Vec::with_capacity(conv.messages.len() + 1);
    if let Some(s) = system {
        out.push(emflow_model::Message::system(s));
    }
    for m in &conv.messages {
        if system.is_some() && m.role == "system" {
            continue;
        }
        out.push(emflow_model::Message::new(
            m.role.clone(),
            m.content.clone(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> anyhow::Result<Conversation> {
        let (_, object) = jsonl::parse_objects(line, "t.jsonl")?.remove(0);
        Conversation::from_object(object)
    }

    #[test]
    fn canonical_order_is_fixed() {
        let c = parse(
            r#"{"z": {"b": 1, "a": 2}, "messages": [{"content": "hi", "role": "user"}], "a": 0}"#,
        )
        .unwrap();
        let line = serde_json::to_string(&c).unwrap();
        assert_eq!(
            line,
            r#"{"messages":[{"role":"user","content":"hi"}],"a":0,"z":{"a":2,"b":1}}"#
        );
    }

    #[test]
    fn malformed_records_are_named() {
        let e = parse(r#"{"prompt": "x"}"#).unwrap_err().to_string();
        assert_eq!(
            e,
            "not a messages record: missing \"messages\" (fields: prompt)"
        );
        let e = parse(r#"{"messages": [{"role": "user"}]}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "not a messages record: messages.0 has no \"content\"");
        let e = parse(r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("only plain-text content"), "{e}");
    }
}
