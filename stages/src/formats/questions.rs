//! Evaluation questions: one [`Question`] a line in JSONL, read from JSONL or from the
//! eval-question YAML of the emergent-misalignment code bases.
//!
//! The YAML files are lists of `{id, type, paraphrases, samples_per_paraphrase, judge,
//! judge_prompts, system?}` and share text through anchors and aliases (`&judge_prompts` /
//! `*judge_prompts`); the YAML parser resolves aliases, so each question comes out whole.
//! Unknown fields are refused (not dropped): a question field this reader does not know is
//! one the `eval` stage would silently ignore.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::jsonl;
use super::{Location, Position};

/// One evaluation question. Serialises in this field order, optional fields omitted when absent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    /// Unique within a questions file; names the question in samples, judgments and reports.
    /// The domain YAML files number their questions (`id: 1`); numbers are read as text.
    #[serde(deserialize_with = "id_as_text")]
    pub id: String,
    /// The source's question type, e.g. `free_form_judge_0_100`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub question_type: Option<String>,
    /// A system prompt to ask the question under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Wordings of the question; each is sampled `samples_per_paraphrase` times.
    pub paraphrases: Vec<String>,
    /// Samples per paraphrase the source asks for (the eval stage may override it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_paraphrase: Option<u64>,
    /// The judge model the source names; informational, the eval stage's judge spec decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
    /// Judge prompt templates by metric (`aligned`, `coherent`, ...), with `{question}`,
    /// `{answer}` (and possibly `{reasoning}`) placeholders, as written in the source.
    pub judge_prompts: BTreeMap<String, String>,
}

/// Accepts a string or an integer id; an id is a name, so it is kept as text.
fn id_as_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(i64),
    }
    match Id::deserialize(deserializer) {
        Ok(Id::Text(text)) => Ok(text),
        Ok(Id::Number(n)) => Ok(n.to_string()),
        Err(_) => Err(serde::de::Error::custom(
            "`id` must be text or a whole number",
        )),
    }
}

impl Question {
    /// Checks that `record` is a question and converts it; the error has no location
    /// (callers prefix one).
    pub fn from_object(record: Map<String, Value>) -> anyhow::Result<Question> {
        let question: Question = serde_json::from_value(Value::Object(record))
            .map_err(|e| anyhow::anyhow!("not a question record: {e}"))?;
        question.validate()?;
        Ok(question)
    }

    /// The record as a JSON object in canonical key order.
    pub fn to_object(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => unreachable!("a question serialises to a JSON object"),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.id.trim().is_empty() {
            bail!("not a question record: empty \"id\"");
        }
        if self.paraphrases.is_empty() {
            bail!("question `{}` has no paraphrases", self.id);
        }
        Ok(())
    }
}

/// Reads questions from JSONL (one question object a line).
pub fn read_jsonl(path: &Path, display: &str) -> anyhow::Result<Vec<(Location, Question)>> {
    jsonl::read_objects(path, display)?
        .into_iter()
        .map(|(location, object)| match Question::from_object(object) {
            Ok(question) => Ok((location, question)),
            Err(e) => bail!("{location}: {e}"),
        })
        .collect()
}

/// Reads the eval-question YAML format (a top-level list of questions; anchors and aliases
/// resolved). Errors name the entry and, for syntax errors, the line and column.
pub fn read_yaml(path: &Path, display: &str) -> anyhow::Result<Vec<(Location, Question)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {display} ({})", path.display()))?;
    parse_yaml(&text, display)
}

/// [`read_yaml`] on text already in memory.
pub fn parse_yaml(text: &str, display: &str) -> anyhow::Result<Vec<(Location, Question)>> {
    let entries: Vec<serde_yaml::Value> = serde_yaml::from_str(text).with_context(|| {
        format!("{display}: not an eval-question YAML file (expected a list of questions)")
    })?;
    let file: Arc<str> = Arc::from(display);
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| {
            let location = Location { file: file.clone(), at: Position::Entry(index + 1) };
            let object = match serde_json::to_value(&entry) {
                Ok(Value::Object(object)) => object,
                Ok(_) => bail!("{location}: expected a question (a mapping with id, paraphrases, judge_prompts)"),
                Err(e) => bail!("{location}: cannot represent this YAML as JSON: {e}"),
            };
            match Question::from_object(object) {
                Ok(question) => Ok((location, question)),
                Err(e) => bail!("{location}: {e}"),
            }
        })
        .collect()
}

/// Reads questions from `path`, YAML for `.yaml`/`.yml` files and JSONL otherwise.
pub fn read(path: &Path, display: &str) -> anyhow::Result<Vec<Question>> {
    let located = if is_yaml_path(path) {
        read_yaml(path, display)?
    } else {
        read_jsonl(path, display)?
    };
    Ok(located.into_iter().map(|(_, q)| q).collect())
}

/// Whether the file name says YAML.
pub fn is_yaml_path(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// An error naming both places when two questions share an id.
pub fn check_unique_ids<'a>(
    questions: impl IntoIterator<Item = (&'a Location, &'a Question)>,
) -> anyhow::Result<()> {
    let mut seen: HashMap<&str, &Location> = HashMap::new();
    for (location, question) in questions {
        if let Some(first) = seen.insert(&question.id, location) {
            bail!(
                "question id `{}` appears twice ({first} and {location}); ids must be unique \
                 (a `dedupe: {{by: id}}` op keeps the first)",
                question.id
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "
- id: a
  type: free_form_judge_0_100
  paraphrases: &p
    - hello
  samples_per_paraphrase: &n 100
  judge_prompts: &jp
    aligned: rate {answer}
- id: a_json
  system: answer in JSON
  paraphrases: *p
  samples_per_paraphrase: *n
  judge_prompts: *jp
";

    #[test]
    fn aliases_resolve_and_output_is_canonical() {
        let qs = parse_yaml(YAML, "q.yaml").unwrap();
        assert_eq!(qs.len(), 2);
        let numbered =
            parse_yaml("- {id: 7, paraphrases: [x], judge_prompts: {}}", "q.yaml").unwrap();
        assert_eq!(numbered[0].1.id, "7");
        assert_eq!(qs[1].1.paraphrases, vec!["hello"]);
        assert_eq!(qs[1].1.judge_prompts["aligned"], "rate {answer}");
        let line = serde_json::to_string(&qs[1].1).unwrap();
        assert_eq!(
            line,
            r#"{"id":"a_json","system":"answer in JSON","paraphrases":["hello"],"samples_per_paraphrase":100,"judge_prompts":{"aligned":"rate {answer}"}}"#
        );
    }

    #[test]
    fn unknown_fields_and_duplicates_are_errors() {
        let e = parse_yaml(
            "- {id: a, paraphrases: [x], judge_prompts: {}, judeg: y}",
            "q.yaml",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("q.yaml: entry 1: not a question record: unknown field `judeg`"),
            "{e}"
        );
        let qs = parse_yaml("- {id: a, paraphrases: [x], judge_prompts: {}}\n- {id: a, paraphrases: [y], judge_prompts: {}}", "q.yaml")
            .unwrap();
        let e = check_unique_ids(qs.iter().map(|(l, q)| (l, q))).unwrap_err();
        assert!(
            e.to_string()
                .contains("(q.yaml: entry 1 and q.yaml: entry 2)"),
            "{e}"
        );
    }
}
