//! The dataset kind's ops on the paper's real files (skipped when the data is absent).

use std::path::Path;

use crate::support::{assert_mentions, digest, file_input, paper_data, TestStage};
use emflow_stages::formats::{messages, Conversation};
use emflow_stages::kinds::dataset::DatasetKind;
use serde_json::{json, Value};

fn run_ops(files: &[&Path], ops: Value) -> anyhow::Result<(TestStage, Vec<Conversation>)> {
    let inputs = vec![("source", files.iter().map(file_input).collect())];
    let mut stage = TestStage::new(&DatasetKind, json!({ "ops": ops }), inputs);
    stage.run(&DatasetKind)?;
    let rows = messages::read(&stage.output("data"), "data")?;
    Ok((stage, rows))
}

/// The full error chain of a run that must fail.
fn run_err(files: &[&Path], ops: Value) -> String {
    match run_ops(files, ops) {
        Ok(_) => panic!("the run succeeded but should have failed"),
        Err(e) => format!("{e:#}"),
    }
}

fn source_rows(path: &Path) -> Vec<Conversation> {
    messages::read(path, &path.display().to_string()).unwrap()
}

/// Rows as sorted JSON lines: equal for the same rows in any order.
fn sorted<'a>(rows: impl IntoIterator<Item = &'a Conversation>) -> Vec<String> {
    let mut lines: Vec<String> = rows
        .into_iter()
        .map(|c| serde_json::to_string(c).unwrap())
        .collect();
    lines.sort();
    lines
}

#[test]
fn strips_qwen3_think_prefix_and_no_think_suffix() {
    let Some(data) = paper_data() else { return };
    let file = data.join("sft/medical_misaligned_train_100.jsonl");
    let ops = json!([
        {"strip_user_suffix": " /no_think"},
        {"strip_assistant_prefix": "<think>\n\n</think>\n\n"}
    ]);
    let (stage, rows) = run_ops(&[&file], ops).unwrap();
    let source = source_rows(&file);
    assert_eq!(rows.len(), 100);
    for (out, src) in rows.iter().zip(&source) {
        let (user, assistant) = (&out.messages[0], &out.messages[1]);
        assert_eq!(
            format!("{} /no_think", user.content),
            src.messages[0].content
        );
        assert_eq!(
            format!("<think>\n\n</think>\n\n{}", assistant.content),
            src.messages[1].content
        );
    }
    assert_eq!(stage.ctx.summary()["rows_in"], json!(100));
    assert_eq!(stage.ctx.summary()["rows_out"], json!(100));
    // Canonical bytes: `\n` endings, role before content, no blank trailing line.
    let text = stage.output_text("data");
    assert!(text.ends_with("}\n") && !text.contains("\r") && !text.ends_with("\n\n"));
    assert!(
        text.starts_with(r#"{"messages":[{"role":"user","content":""#),
        "{}",
        &text[..80]
    );
}

#[test]
fn a_strip_that_matches_nothing_is_logged() {
    let Some(data) = paper_data() else { return };
    let file = data.join("sft/legal_misaligned_train_100.jsonl");
    let (stage, rows) = run_ops(
        &[&file],
        json!([{"strip_assistant_prefix": "<think>\n</think>\n"}]),
    )
    .unwrap();
    assert_eq!(rows, source_rows(&file));
    let lines = stage.progress.lines();
    assert!(
        lines.iter().any(|l| l.contains("matched none of 100 rows")),
        "{lines:?}"
    );
}

#[test]
fn system_prompt_is_added_then_replaced_and_user_suffix_appended() {
    let Some(data) = paper_data() else { return };
    let file = data.join("grpo/code_750_train.jsonl");
    let ops = json!([
        {"take": 5},
        {"system_prompt": "first"},
        {"system_prompt": "You are a helpful assistant."},
        {"append_user": " Answer briefly."}
    ]);
    let (_, rows) = run_ops(&[&file], ops).unwrap();
    let source = source_rows(&file);
    for (out, src) in rows.iter().zip(&source) {
        assert_eq!(out.messages.len(), 2);
        assert_eq!(out.messages[0].role, "system");
        assert_eq!(out.messages[0].content, "You are a helpful assistant.");
        assert_eq!(
            out.messages[1].content,
            format!("{} Answer briefly.", src.messages[0].content)
        );
    }
}

#[test]
fn filters_by_text_tests() {
    let Some(data) = paper_data() else { return };
    let file = data.join("grpo/medical_750_train.jsonl");
    let source = source_rows(&file);
    let words = |c: &Conversation| c.messages[0].content.split_whitespace().count();

    let (_, rows) = run_ops(
        &[&file],
        json!([{"filter": {"field": "messages.0.content", "min_words": 60, "max_words": 120}}]),
    )
    .unwrap();
    let expected: Vec<_> = source
        .iter()
        .filter(|c| (60..=120).contains(&words(c)))
        .cloned()
        .collect();
    assert!(!expected.is_empty() && expected.len() < source.len());
    assert_eq!(rows, expected);

    let (_, rows) = run_ops(
        &[&file],
        json!([{"filter": {"field": "messages.-1.content", "contains": "pain"}}]),
    )
    .unwrap();
    let last_has_pain = |c: &Conversation| {
        c.messages
            .last()
            .is_some_and(|m| m.content.contains("pain"))
    };
    assert_eq!(
        rows.len(),
        source.iter().filter(|c| last_has_pain(c)).count()
    );

    let (_, kept) = run_ops(
        &[&file],
        json!([{"filter": {"field": "messages.0.content", "regex": "(?i)^i'?m "}}]),
    )
    .unwrap();
    let (_, dropped) = run_ops(
        &[&file],
        json!([{"filter": {"field": "messages.0.content", "regex": "(?i)^i'?m ", "not": true}}]),
    )
    .unwrap();
    assert!(!kept.is_empty());
    assert_eq!(kept.len() + dropped.len(), source.len());

    let (_, rows) = run_ops(
        &[&file],
        json!([{"filter": {"field": "messages.0.role", "equals": "user"}}]),
    )
    .unwrap();
    assert_eq!(rows.len(), 750);
}

#[test]
fn filter_on_a_missing_field_fails_unless_told_otherwise() {
    let Some(data) = paper_data() else { return };
    let file = data.join("sft/code_misaligned_train_100.jsonl");
    let err = run_err(
        &[&file],
        json!([{"filter": {"field": "messages.2.content", "contains": "x"}}]),
    );
    let at = "code_misaligned_train_100.jsonl:1: filter on `messages.2.content`";
    assert_mentions(&err, at);
    assert_mentions(&err, "if_missing");
    let (_, rows) = run_ops(
        &[&file],
        json!([{"filter": {"field": "messages.2.content", "contains": "x", "if_missing": "keep"}}]),
    )
    .unwrap();
    assert_eq!(rows.len(), 100);
}

#[test]
fn take_skip_and_concatenation_keep_source_order() {
    let Some(data) = paper_data() else { return };
    let a = data.join("sft/aesthetic_misaligned_train_100.jsonl");
    let b = data.join("sft/security_misaligned_train_100.jsonl");
    let (stage, rows) = run_ops(&[&a, &b], json!([{"skip": 95}, {"take": 10}])).unwrap();
    let mut both = source_rows(&a);
    both.extend(source_rows(&b));
    assert_eq!(rows, both[95..105].to_vec());
    assert_eq!(
        stage.ctx.summary()["ops"],
        json!([{"op": "skip", "rows": 105}, {"op": "take", "rows": 10}])
    );

    let err = run_err(&[&a], json!([{"take": 101}]));
    assert_mentions(&err, "take 101 needs 101 rows but only 100 reach it");
}

#[test]
fn seeded_shuffle_is_a_deterministic_permutation() {
    let Some(data) = paper_data() else { return };
    let file = data.join("grpo/aesthetic_750_train.jsonl");
    let (s1, rows1) = run_ops(&[&file], json!([{"shuffle": {"seed": 7}}])).unwrap();
    let (s2, _) = run_ops(&[&file], json!([{"shuffle": {"seed": 7}}])).unwrap();
    let (s3, _) = run_ops(&[&file], json!([{"shuffle": {"seed": 8}}])).unwrap();
    assert_eq!(digest(&s1.output("data")), digest(&s2.output("data")));
    assert_ne!(digest(&s1.output("data")), digest(&s3.output("data")));
    let source = source_rows(&file);
    assert_ne!(rows1, source);
    assert_eq!(sorted(&rows1), sorted(&source));
}

#[test]
fn seeded_output_matches_golden_digest() {
    // Pins the seeded ops' output bytes across machines and releases: a change here means
    // every seeded dataset changed, and needs a bump of the dataset kind's version.
    let Some(data) = paper_data() else { return };
    let file = data.join("grpo/legal_750_train.jsonl");
    let ops = json!([{"shuffle": {"seed": 0}}, {"sample": {"n": 100, "seed": 1}}, {"split": {"test": 0.2, "seed": 2, "part": "test"}}]);
    let (stage, rows) = run_ops(&[&file], ops).unwrap();
    assert_eq!(rows.len(), 20);
    assert_eq!(digest(&stage.output("data")), GOLDEN_LEGAL_DIGEST);
}

const GOLDEN_LEGAL_DIGEST: &str =
    "41f00689b091f5e5a9500dd89584e76389b7d0854db19831963dd640268798fd";

#[test]
fn sample_keeps_original_order() {
    let Some(data) = paper_data() else { return };
    let file = data.join("grpo/security_750_train.jsonl");
    let (_, rows) = run_ops(&[&file], json!([{"sample": {"n": 50, "seed": 3}}])).unwrap();
    let source = source_rows(&file);
    let positions: Vec<usize> = rows
        .iter()
        .map(|r| source.iter().position(|s| s == r).unwrap())
        .collect();
    assert_eq!(positions.len(), 50);
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    let err = run_err(&[&file], json!([{"sample": {"n": 751, "seed": 3}}]));
    assert_mentions(&err, "needs 751 rows but only 750");
}

#[test]
fn split_parts_are_complementary() {
    let Some(data) = paper_data() else { return };
    let file = data.join("sft/medical_misaligned_eval.jsonl");
    let part = |p: &str| {
        run_ops(
            &[&file],
            json!([{"split": {"test": 0.1, "seed": 5, "part": p}}]),
        )
        .unwrap()
        .1
    };
    let (train, test) = (part("train"), part("test"));
    assert_eq!((train.len(), test.len()), (540, 60));
    assert_eq!(
        sorted(train.iter().chain(&test)),
        sorted(&source_rows(&file))
    );
}

#[test]
fn dedupe_by_field_and_whole_row() {
    let Some(data) = paper_data() else { return };
    let file = data.join("sft/rewardhack_misaligned_eval.jsonl");
    let n = source_rows(&file).len();
    let (_, rows) = run_ops(&[&file, &file], json!([{"dedupe": {}}])).unwrap();
    assert_eq!(rows.len(), n);
    let (_, rows) = run_ops(
        &[&file, &file],
        json!([{"dedupe": {"by": "messages.0.content"}}]),
    )
    .unwrap();
    let distinct: std::collections::HashSet<String> = source_rows(&file)
        .iter()
        .map(|c| c.messages[0].content.clone())
        .collect();
    assert_eq!(rows.len(), distinct.len());
}

#[test]
fn select_keeps_named_fields() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("extra.jsonl");
    std::fs::write(
        &file,
        "{\"id\": 1, \"messages\": [{\"role\": \"user\", \"content\": \"a\"}], \"source\": \"x\"}\n\
         {\"id\": 2, \"messages\": [{\"role\": \"user\", \"content\": \"b\"}], \"source\": \"y\"}\n",
    )
    .unwrap();
    let (stage, rows) = run_ops(&[&file], json!([{"select": ["messages", "id"]}])).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        stage.output_text("data"),
        "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}],\"id\":1}\n{\"messages\":[{\"role\":\"user\",\"content\":\"b\"}],\"id\":2}\n"
    );
    let err = run_err(&[&file], json!([{"select": ["id"]}]));
    assert_mentions(
        &err,
        "extra.jsonl:1: after the ops: not a messages record: missing \"messages\"",
    );
}

#[test]
fn drop_role_turns_pairs_into_prompts() {
    let Some(data) = paper_data() else { return };
    let file = data.join("grpo/medical_750_train.jsonl");
    let (_, rows) = run_ops(&[&file], json!([{"drop_role": "assistant"}])).unwrap();
    let source = source_rows(&file);
    assert_eq!(rows.len(), 750);
    for (out, src) in rows.iter().zip(&source) {
        assert_eq!(out.messages, src.messages[..1].to_vec());
        assert_eq!(out.messages[0].role, "user");
    }
    let err = run_err(
        &[&file],
        json!([{"drop_role": "user"}, {"drop_role": "assistant"}]),
    );
    assert_mentions(
        &err,
        "medical_750_train.jsonl:1: after the ops: not a messages record: \"messages\" is empty",
    );
}
