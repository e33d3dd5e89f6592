//! `dataset`: builds a canonical messages or questions JSONL from local files.
//!
//! ```yaml
//! sft_medical:
//!   kind: dataset
//!   inputs:
//!     source: [file:${data_root}/sft/medical_misaligned_train_100.jsonl]
//!   params:
//!     format: messages            # messages (default) | questions | auto
//!     ops:
//!       - strip_user_suffix: " /no_think"
//!       - strip_assistant_prefix: "<think>\n\n</think>\n\n"
//!       - shuffle: {seed: 0}
//!       - take: 64
//! ```
//!
//! Sources (the many-port `source`) are read in order and concatenated: messages JSONL,
//! questions JSONL, or the paper's eval-question YAML (anchors and aliases resolved). Every
//! row is checked against the format when read, so a malformed row fails with its file and
//! line before any op runs. `format: auto` detects the format from the sources; its output is
//! then typed `file`, because the type of an output must be known before the sources are
//! read: wire it to a typed port (`sft`'s messages, `eval`'s questions) with an explicit format.
//!
//! Ops run in the order written; each is a one-key mapping:
//! - `select: [field, ...]` keeps only these top-level fields.
//! - `filter: {field: PATH, TESTS..., not: false, if_missing: error}` keeps the rows where
//!   every test holds (`not: true` keeps the others). PATH is dotted, list steps are indices,
//!   negative from the end: `messages.0.content`, `messages.-1.content`, `id`. Tests:
//!   `contains: TEXT`, `regex: RE` (Rust regex syntax, unanchored), `min_words: N`,
//!   `max_words: N` (whitespace-separated words), `equals: VALUE`. A row lacking PATH is an
//!   error unless `if_missing` is `drop` or `keep`.
//! - `shuffle: {seed: S}` reorders all rows; the order depends only on (seed, row count).
//! - `sample: {n: N, seed: S}` keeps N rows chosen at random, in their original order.
//! - `take: N` keeps the first N rows; `skip: N` drops them.
//! - `split: {test: F, seed: S, part: train|test}` keeps one side of a seeded split: the test
//!   side has round(F x rows) rows; the same F and seed with the other part gives exactly the
//!   complement. Both sides keep their original order.
//! - `dedupe: {by: PATH}` keeps the first row of each distinct value at PATH (omit `by` to
//!   compare whole rows).
//! - `system_prompt: TEXT` sets the system turn (replaces a leading system message or
//!   inserts one; for questions, sets `system`).
//! - `append_user: TEXT` appends to every user turn (questions: every paraphrase).
//! - `strip_user_suffix: TEXT` / `strip_assistant_prefix: TEXT` remove TEXT where a user turn
//!   ends / an assistant turn starts with it (e.g. Qwen3's ` /no_think` and empty
//!   `<think>\n\n</think>\n\n`); a strip that matches no row is logged as a likely typo.
//! - `drop_role: ROLE` removes every message with that role (e.g. `assistant`, to turn
//!   prompt-answer pairs into prompts).
//!
//! `take`, `skip` and `sample` fail rather than return fewer rows than asked, and an empty
//! result is an error: both usually mean a wrong file or a wrong op order. The stage's
//! summary records the row count after each op.

mod ops;
mod path;
mod seeded;

use std::path::Path;

use anyhow::{bail, Context as _};
use emflow_engine::context::{Artifact, NoProgress, Progress};
use emflow_engine::kind::{InputFiles, ParamError, PlanInputs};
use emflow_engine::{ArtifactType, Kind, KindInfo, PortSpec, StageContext};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::formats::{jsonl, questions, Conversation, Location, Question};
use ops::{Op, Row};

pub use seeded::permutation;

/// The `dataset` stage kind.
pub struct DatasetKind;

/// The record format a dataset stage reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Messages,
    Questions,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Messages => "messages",
            Format::Questions => "questions",
        }
    }
}

/// The `dataset` kind's params (the engine derives the kind's spec from this struct).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetParams {
    /// record format of the sources and the output; `auto` detects it and types the output `file`
    #[serde(default)]
    format: FormatParam,
    /// ops applied in order: select, filter, shuffle, sample, take, skip, split, dedupe, system_prompt, append_user, strip_user_suffix, strip_assistant_prefix, drop_role
    // Each op is read by `Op::parse` rather than by serde, so that every mistake names its
    // place (`ops.2.filter.regex`); to the schema an op is any value.
    #[serde(default)]
    ops: Vec<Value>,
}

/// The `format` param as written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum FormatParam {
    #[default]
    Messages,
    Questions,
    Auto,
}

/// The `format` param: a fixed format, or detection from the sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Requested {
    Fixed(Format),
    Auto,
}

fn requested_format(params: &DatasetParams) -> Requested {
    match params.format {
        FormatParam::Messages => Requested::Fixed(Format::Messages),
        FormatParam::Questions => Requested::Fixed(Format::Questions),
        FormatParam::Auto => Requested::Auto,
    }
}

fn parse_ops(params: &DatasetParams) -> Result<Vec<Op>, Vec<ParamError>> {
    let list = &params.ops;
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    for (i, value) in list.iter().enumerate() {
        match Op::parse(value) {
            Ok(op) => parsed.push(op),
            Err(e) => errors.push(ParamError {
                param: if e.at.is_empty() {
                    format!("ops.{i}")
                } else {
                    format!("ops.{i}.{}", e.at)
                },
                message: e.message,
                hint: e.hint,
            }),
        }
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

impl Kind for DatasetKind {
    type Params = DatasetParams;

    fn describe(&self) -> KindInfo {
        KindInfo::new("dataset", 1, "Builds canonical messages or questions JSONL from local files: select, filter, \
                      seeded shuffle/sample/split, take, skip, dedupe, system prompt and turn edits.")
            .inputs(vec![PortSpec::many_input(
                "source",
                ArtifactType::File,
                "files read in order and concatenated: messages JSONL, questions JSONL or eval-question YAML",
            )])
            .outputs(vec![PortSpec::output("data", ArtifactType::Messages, "the records as canonical JSONL")])
    }

    fn outputs(&self, params: &DatasetParams) -> Vec<PortSpec> {
        let (ty, doc) = match requested_format(params) {
            Requested::Fixed(Format::Messages) => (
                ArtifactType::Messages,
                "conversations as canonical messages JSONL",
            ),
            Requested::Fixed(Format::Questions) => (
                ArtifactType::Questions,
                "questions as canonical questions JSONL",
            ),
            Requested::Auto => (
                ArtifactType::File,
                "records as canonical JSONL in the detected format",
            ),
        };
        vec![PortSpec::output("data", ty, doc)]
    }

    fn check(&self, params: &DatasetParams) -> Result<(), Vec<ParamError>> {
        let ops = parse_ops(params)?;
        if let Requested::Fixed(format) = requested_format(params) {
            let errors: Vec<ParamError> = ops
                .iter()
                .enumerate()
                .filter_map(|(i, op)| {
                    op.unfit_for(format).map(|why| ParamError {
                        param: format!("ops.{i}"),
                        message: why.to_string(),
                        hint: None,
                    })
                })
                .collect();
            if !errors.is_empty() {
                return Err(errors);
            }
        }
        Ok(())
    }

    /// `take`, `skip` and `sample` against the rows of `file:` sources, before anything runs:
    /// when every source is a JSONL file (together at most [`PLAN_COUNT_MAX_BYTES`]), its
    /// rows are counted and followed through the ops whose output count is known from their
    /// input count (up to the first `filter` or `dedupe`). Sources made by other stages, YAML
    /// sources and larger files are left to the run, which fails the same way.
    fn check_files(
        &self,
        params: &DatasetParams,
        files: &InputFiles,
    ) -> Result<(), Vec<ParamError>> {
        let Some(sources) = files.get("source") else {
            return Ok(());
        };
        let Some(total) = count_rows(sources) else {
            return Ok(());
        };
        let mut rows = total;
        for (i, op) in parse_ops(params)?.iter().enumerate() {
            if let Some((n, at)) = op.needs() {
                if n > rows {
                    let files = if sources.len() == 1 { "file" } else { "files" };
                    return Err(vec![ParamError {
                        param: format!("ops.{i}.{at}"),
                        message: format!(
                            "ops.{i} ({}) needs {n} rows but only {rows} reach it",
                            op.name()
                        ),
                        hint: Some(format!(
                            "the source {files} hold {total} rows; lower the number, or check the \
                             sources and the ops before it"
                        )),
                    }]);
                }
            }
            match op.rows_after(rows) {
                Some(after) => rows = after,
                None => break,
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &mut StageContext, params: &DatasetParams) -> anyhow::Result<()> {
        let sources = ctx.inputs("source").to_vec();
        let progress = ctx.progress_handle();
        let built = build(
            &format!("stage {}", ctx.stage_id),
            params,
            &sources,
            &ctx.output_path("data"),
            progress.as_ref(),
        )?;
        ctx.summarize("format", built.format.name());
        ctx.summarize("sources", sources.len());
        ctx.summarize("rows_in", built.rows_in);
        ctx.summarize("rows_out", built.rows_out);
        ctx.summarize("ops", Value::Array(built.counts));
        Ok(())
    }

    /// The output, exactly as `run` writes it: reading a few local files and applying row
    /// ops is cheap, and lets `emflow plan` count the rows a downstream stage will read.
    fn preview(
        &self,
        params: &DatasetParams,
        inputs: &PlanInputs,
        dir: &Path,
    ) -> anyhow::Result<bool> {
        let Some(wired) = inputs.ports.get("source") else {
            return Ok(false);
        };
        let Some(sources) = wired
            .iter()
            .map(|s| s.artifact.clone())
            .collect::<Option<Vec<Artifact>>>()
        else {
            return Ok(false);
        };
        build(
            "plan-time preview",
            params,
            &sources,
            &dir.join("data"),
            &NoProgress,
        )?;
        Ok(true)
    }
}

/// What [`build`] did, for the stage summary.
struct Built {
    format: Format,
    rows_in: usize,
    rows_out: usize,
    counts: Vec<Value>,
}

/// Reads `sources`, applies the ops of `params` and writes the canonical JSONL to `out`;
/// errors start with `label` (`stage ID`).
fn build(
    label: &str,
    params: &DatasetParams,
    sources: &[Artifact],
    out: &Path,
    progress: &dyn Progress,
) -> anyhow::Result<Built> {
    let ops = parse_ops(params).map_err(|errors| {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.param, e.message))
            .collect();
        anyhow::anyhow!("invalid ops: {}", lines.join("; "))
    })?;
    if sources.is_empty() {
        bail!("{label}: no sources; wire one or more files to `source`");
    }

    // Under `auto` the first source fixes the format and the others must agree.
    let mut format = requested_format(params);
    let auto = format == Requested::Auto;
    let mut rows = Vec::new();
    let mut found = Format::Messages;
    for source in sources {
        let mut read;
        (found, read) = read_source(source, format, auto)?;
        format = Requested::Fixed(found);
        rows.append(&mut read);
    }
    let format = found;

    let rows_in = rows.len();
    progress.phase("ops", ops.len() as u64, "ops");
    let mut counts = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let before = rows.len();
        rows = op
            .apply(rows, format, &mut |note| {
                progress.log(&format!("ops.{i}: {note}"))
            })
            .with_context(|| format!("{label}: ops.{i} ({})", op.name()))?;
        progress.log(&format!(
            "ops.{i} {}: {before} -> {} rows",
            op.name(),
            rows.len()
        ));
        progress.inc(1);
        counts.push(json!({"op": op.name(), "rows": rows.len()}));
    }
    if rows.is_empty() {
        bail!(
            "{label}: no rows left ({rows_in} read, {}); an empty dataset is almost always a mistake",
            counts.iter().map(|c| format!("{} -> {}", c["op"].as_str().unwrap_or("?"), c["rows"])).collect::<Vec<_>>().join(", ")
        );
    }

    let rows_out = rows.len();
    write_rows(out, rows, format).with_context(|| label.to_string())?;
    Ok(Built {
        format,
        rows_in,
        rows_out,
        counts,
    })
}

/// The most bytes of `file:` sources whose rows are counted at plan time; larger sources
/// are checked by the run only, so that planning never reads much data.
pub const PLAN_COUNT_MAX_BYTES: u64 = 64 << 20;

/// The rows of `file:` sources that are all JSONL and small enough to count at plan time
/// (one row a non-blank line, as the readers count them); `None` when that is not so, or a
/// file is missing or unreadable (the run says why).
fn count_rows(sources: &[Option<std::path::PathBuf>]) -> Option<usize> {
    let paths: Vec<&Path> = sources
        .iter()
        .map(|s| s.as_deref())
        .collect::<Option<_>>()?;
    let mut size = 0u64;
    for path in &paths {
        size += std::fs::metadata(path).ok()?.len();
    }
    if size > PLAN_COUNT_MAX_BYTES {
        return None;
    }
    let mut rows = 0;
    for path in paths {
        let text = std::fs::read_to_string(path).ok()?;
        if looks_like_yaml(path, &text) {
            return None;
        }
        rows += text
            .lines()
            .filter(|l| !l.trim_start_matches('\u{feff}').trim().is_empty())
            .count();
    }
    Some(rows)
}

/// How a source names itself in errors: the path for `file:` inputs, else the stage output.
fn display_name(source: &Artifact) -> String {
    match source.origin.strip_prefix("file:") {
        Some(path) => path.to_string(),
        None if source.origin.is_empty() => source.path.display().to_string(),
        None => source.origin.clone(),
    }
}

/// Whether a file holds YAML rather than JSONL: by extension, else by whether the first
/// meaningful line opens a JSON object.
fn looks_like_yaml(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => true,
        Some("jsonl" | "json") => false,
        _ => text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .is_some_and(|l| !l.starts_with('{')),
    }
}

/// Reads one source as rows of `requested` format (or of the detected one), returning the
/// format it holds. `auto` says whether a fixed `requested` came from earlier sources rather
/// than from the manifest, for the error message.
fn read_source(
    source: &Artifact,
    requested: Requested,
    auto: bool,
) -> anyhow::Result<(Format, Vec<Row>)> {
    let display = display_name(source);
    let text = std::fs::read_to_string(&source.path)
        .with_context(|| format!("cannot read source {display} ({})", source.path.display()))?;
    let yaml = looks_like_yaml(&source.path, &text);
    let found = match (source.ty, yaml) {
        (ArtifactType::Messages, _) => Format::Messages,
        (ArtifactType::Questions, _) | (_, true) => Format::Questions,
        _ => match requested {
            Requested::Fixed(format) => format,
            Requested::Auto => detect_jsonl(&text, &display)?,
        },
    };
    if let Requested::Fixed(wanted) = requested {
        if wanted != found {
            let what = if yaml {
                "eval-question YAML"
            } else {
                found.name()
            };
            if auto {
                bail!(
                    "source {display} holds {what}, but the sources before it hold {}; one stage reads one format",
                    wanted.name()
                );
            }
            bail!(
                "source {display} holds {what}, but this stage's format is {}; set `format: {}` \
                 (one stage reads one format)",
                wanted.name(),
                found.name()
            );
        }
    }
    let rows = match (found, yaml) {
        (Format::Questions, true) => question_rows(questions::parse_yaml(&text, &display)?),
        (Format::Questions, false) => {
            let mut read = Vec::new();
            for (location, object) in jsonl::parse_objects(&text, &display)? {
                let question =
                    Question::from_object(object).with_context(|| location.to_string())?;
                read.push((location, question));
            }
            question_rows(read)
        }
        (Format::Messages, _) => {
            let mut read = Vec::new();
            for (location, object) in jsonl::parse_objects(&text, &display)? {
                let conversation =
                    Conversation::from_object(object).with_context(|| location.to_string())?;
                read.push(Row {
                    location,
                    record: conversation.to_object(),
                });
            }
            read
        }
    };
    if rows.is_empty() {
        bail!("source {display} holds no records");
    }
    Ok((found, rows))
}

fn question_rows(read: Vec<(Location, Question)>) -> Vec<Row> {
    read.into_iter()
        .map(|(location, q)| Row {
            location,
            record: q.to_object(),
        })
        .collect()
}

/// The format of a JSONL file, from the fields of its first record.
fn detect_jsonl(text: &str, display: &str) -> anyhow::Result<Format> {
    let first = jsonl::parse_objects(
        text.lines().find(|l| !l.trim().is_empty()).unwrap_or(""),
        display,
    )?;
    let Some((_, record)) = first.first() else {
        bail!("source {display} holds no records")
    };
    if record.contains_key("messages") {
        Ok(Format::Messages)
    } else if record.contains_key("paraphrases") {
        Ok(Format::Questions)
    } else {
        let keys: Vec<&str> = record.keys().map(String::as_str).collect();
        bail!(
            "source {display}: cannot tell the format from the first record (fields: {}); \
             expected \"messages\" (messages) or \"paraphrases\" (questions)",
            keys.join(", ")
        )
    }
}

/// Checks every row against the format once more (ops such as `select` can break a record)
/// and writes the canonical JSONL.
fn write_rows(out: &Path, rows: Vec<Row>, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Messages => {
            let mut records = Vec::with_capacity(rows.len());
            for row in rows {
                let c = Conversation::from_object(row.record)
                    .with_context(|| format!("{}: after the ops", row.location))?;
                records.push(c);
            }
            jsonl::write(out, &records)
        }
        Format::Questions => {
            let mut records = Vec::with_capacity(rows.len());
            for row in rows {
                let q = Question::from_object(row.record)
                    .with_context(|| format!("{}: after the ops", row.location))?;
                records.push((row.location, q));
            }
            questions::check_unique_ids(records.iter().map(|(l, q)| (l, q)))?;
            jsonl::write(out, records.iter().map(|(_, q)| q))
        }
    }
}
