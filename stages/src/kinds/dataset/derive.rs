//! The dataset ops that add to records or make new ones, rather than filter or edit text:
//! `number` (a row id), `mark_split` (a recorded, near-duplicate-aware seeded split),
//! `template_reply` (an assistant turn chosen from fixed texts) and `to_questions` (prompt
//! rows as eval questions). The last two draw on the stage's `template` input, a [`Template`].

use std::collections::BTreeMap;

use anyhow::{bail, Context as _};
use emflow_engine::context::Artifact;
use serde_json::{json, Value};

use super::near_dup;
use super::ops::{Args, OpError, Row};
use super::path::FieldPath;
use super::seeded::choose;
use crate::formats::jsonl::{self, json_kind};
use crate::formats::{questions, Conversation, Message, Question};

/// `mark_split`'s arguments.
#[derive(Clone, Debug)]
pub struct MarkSplit {
    /// Fraction of the rows the test side aims at (round(test x rows), never more).
    test: f64,
    seed: u64,
    /// Words per n-gram of the near-duplicate rule.
    ngram: usize,
    /// Where the text is; `None`: the first user turn.
    text: Option<FieldPath>,
    /// The field the split is written to.
    field: String,
}

/// The n-gram length `mark_split` uses unless told otherwise.
pub const DEFAULT_NGRAM: usize = 8;

pub fn parse_number(arg: &Value, at: &str) -> Result<(String, String), OpError> {
    let args = Args::new(arg, at, &["field", "prefix"])?;
    let prefix = match args.optional("prefix") {
        None => String::new(),
        Some(_) => args.string("prefix")?,
    };
    Ok((args.field_name("field")?, prefix))
}

pub fn parse_mark_split(arg: &Value, at: &str) -> Result<MarkSplit, OpError> {
    let args = Args::new(arg, at, &["test", "seed", "ngram", "text", "field"])?;
    let ngram = match args.optional("ngram") {
        None => DEFAULT_NGRAM,
        Some(_) => args.count("ngram")?,
    };
    if ngram == 0 {
        return Err(args.error("ngram", "an n-gram has at least one word"));
    }
    let text = match args.optional("text") {
        None => None,
        Some(_) => Some(args.path("text")?),
    };
    let field = match args.optional("field") {
        None => "split".to_string(),
        Some(_) => args.field_name("field")?,
    };
    Ok(MarkSplit {
        test: args.fraction("test")?,
        seed: args.u64("seed")?,
        ngram,
        text,
        field,
    })
}

/// Writes `prefix` + the row's 1-based position into `field`.
pub fn number(rows: Vec<Row>, field: &str, prefix: &str) -> Vec<Row> {
    rows.into_iter()
        .enumerate()
        .map(|(i, mut row)| {
            row.record
                .insert(field.to_string(), json!(format!("{prefix}{}", i + 1)));
            row
        })
        .collect()
}

/// The text a row is compared by: the value at `path`, else the first user turn.
fn row_text(row: &Row, path: Option<&FieldPath>) -> anyhow::Result<String> {
    let found = match path {
        Some(path) => match path.resolve(&row.record) {
            Ok(Some(Value::String(s))) => return Ok(s.clone()),
            Ok(Some(other)) => bail!("`{path}` is {}, not text", json_kind(other)),
            Ok(None) => bail!("the row has no `{path}`"),
            Err(e) => bail!("{e}"),
        },
        None => Conversation::from_object(row.record.clone())?
            .first_user()
            .map(|m| m.content.clone()),
    };
    found.context("the row has no user turn; name the text with `text: PATH`")
}

/// Keeps every row and writes `{part: train|test, group, seed}` into `field`: near-duplicate
/// texts form groups ([`near_dup`]), and whole groups go to the test side in a seeded order
/// up to round(test x rows) rows. `note` hears how many groups had more than one row.
pub fn mark_split(
    mut rows: Vec<Row>,
    split: &MarkSplit,
    note: &mut dyn FnMut(String),
) -> anyhow::Result<Vec<Row>> {
    let texts = rows
        .iter()
        .map(|r| row_text(r, split.text.as_ref()).with_context(|| r.location.to_string()))
        .collect::<anyhow::Result<Vec<String>>>()?;
    let group_of = near_dup::groups(&texts, split.ngram);
    let target = (rows.len() as f64 * split.test).round() as usize;
    let test = near_dup::test_groups(&group_of, target, split.seed);
    let mut sizes: BTreeMap<usize, usize> = BTreeMap::new();
    for &g in &group_of {
        *sizes.entry(g).or_default() += 1;
    }
    let shared = sizes.values().filter(|&&n| n > 1).count();
    let in_shared: usize = sizes.values().filter(|&&n| n > 1).sum();
    note(format!(
        "{} groups of near-duplicates ({}-grams): {shared} hold more than one row ({in_shared} rows)",
        sizes.len(),
        split.ngram
    ));
    for (row, &g) in rows.iter_mut().zip(&group_of) {
        let part = if test[g] { "test" } else { "train" };
        row.record.insert(
            split.field.clone(),
            json!({"part": part, "group": g, "seed": split.seed}),
        );
    }
    Ok(rows)
}

/// The stage's `template` input: a text file of replies (one a non-blank line) for
/// `template_reply`, or questions (JSONL or eval YAML) whose first question `to_questions`
/// copies its judge prompts from.
pub struct Template {
    display: String,
    text: String,
}

impl Template {
    pub fn read(artifact: &Artifact) -> anyhow::Result<Template> {
        let display = match artifact.origin.strip_prefix("file:") {
            Some(path) => path.to_string(),
            None => artifact.origin.clone(),
        };
        let text = std::fs::read_to_string(&artifact.path).with_context(|| {
            format!(
                "cannot read the template input {display} ({})",
                artifact.path.display()
            )
        })?;
        Ok(Template { display, text })
    }

    /// The non-blank lines, trimmed.
    fn lines(&self) -> anyhow::Result<Vec<&str>> {
        let lines: Vec<&str> = self
            .text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            bail!("the template input {} has no non-blank line", self.display);
        }
        Ok(lines)
    }

    fn first_question(&self) -> anyhow::Result<Question> {
        let yaml = questions::is_yaml_path(std::path::Path::new(&self.display))
            || !self.text.trim_start().starts_with('{');
        let first = if yaml {
            questions::parse_yaml(&self.text, &self.display)?
                .into_iter()
                .next()
                .map(|(_, q)| q)
        } else {
            match jsonl::parse_objects(&self.text, &self.display)?
                .into_iter()
                .next()
            {
                Some((location, object)) => {
                    Some(Question::from_object(object).with_context(|| location.to_string())?)
                }
                None => None,
            }
        };
        first.with_context(|| format!("the template input {} holds no question", self.display))
    }
}

fn needs_template<'t>(template: Option<&'t Template>, op: &str) -> anyhow::Result<&'t Template> {
    template.with_context(|| {
        format!("`{op}` draws on the stage's `template` input, which is not wired; add `template: file:PATH` under `inputs:`")
    })
}

/// Appends an assistant turn to each conversation: one of the template's lines, chosen by
/// [`choose`] from (seed, the conversation's first user turn).
pub fn template_reply(
    rows: Vec<Row>,
    seed: u64,
    template: Option<&Template>,
) -> anyhow::Result<Vec<Row>> {
    let replies = needs_template(template, "template_reply")?.lines()?;
    rows.into_iter()
        .map(|mut row| {
            let mut c = Conversation::from_object(std::mem::take(&mut row.record))
                .with_context(|| row.location.to_string())?;
            let prompt = c
                .first_user()
                .map(|m| m.content.clone())
                .with_context(|| format!("{}: the conversation has no user turn", row.location))?;
            let reply = replies[choose(replies.len(), seed, &prompt)];
            c.messages.push(Message::new("assistant", reply));
            row.record = c.to_object();
            Ok(row)
        })
        .collect()
}

/// Turns each conversation into a question: its first user turn the one paraphrase, its
/// leading system turn (if any) the system prompt, the text at `id` the id, and the template's
/// first question's type, judge and judge prompts.
pub fn to_questions(
    rows: Vec<Row>,
    id: &FieldPath,
    template: Option<&Template>,
) -> anyhow::Result<Vec<Row>> {
    let like = needs_template(template, "to_questions")?.first_question()?;
    rows.into_iter()
        .map(|mut row| {
            let question =
                to_question(&row, id, &like).with_context(|| row.location.to_string())?;
            row.record = question.to_object();
            Ok(row)
        })
        .collect()
}

fn to_question(row: &Row, id: &FieldPath, like: &Question) -> anyhow::Result<Question> {
    let id_text = match id.resolve(&row.record) {
        Ok(Some(Value::String(s))) => s.clone(),
        Ok(Some(Value::Number(n))) => n.to_string(),
        Ok(Some(other)) => bail!("`{id}` is {}, not text or a number", json_kind(other)),
        Ok(None) => bail!("the row has no `{id}` (a `number` op before can write one)"),
        Err(e) => bail!("{e}"),
    };
    let c = Conversation::from_object(row.record.clone())?;
    let system = c
        .messages
        .first()
        .filter(|m| m.role == "system")
        .map(|m| m.content.clone());
    let Some(user) = c.first_user() else {
        bail!("the conversation has no user turn to ask");
    };
    Ok(Question {
        id: id_text,
        question_type: like.question_type.clone(),
        system,
        paraphrases: vec![user.content.clone()],
        samples_per_paraphrase: None,
        judge: like.judge.clone(),
        judge_prompts: like.judge_prompts.clone(),
    })
}
