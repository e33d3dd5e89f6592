//! The dataset kind on eval-question YAML (anchors and aliases), format detection, declared
//! output types, and the errors a user sees for malformed sources and ops.

use std::path::Path;

use crate::support::{assert_mentions, file_input, paper_data, TestStage};
use emflow_engine::{ArtifactType, StageKind};
use emflow_stages::formats::{questions, Question};
use emflow_stages::kinds::dataset::DatasetKind;
use serde_json::{json, Value};

fn run(files: &[&Path], params: Value) -> Result<TestStage, String> {
    let inputs = vec![("source", files.iter().map(file_input).collect())];
    let mut stage = TestStage::new(&DatasetKind, params, inputs);
    match stage.run(&DatasetKind) {
        Ok(()) => Ok(stage),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn output_questions(stage: &TestStage) -> Vec<Question> {
    questions::read_jsonl(&stage.output("data"), "data")
        .unwrap()
        .into_iter()
        .map(|(_, q)| q)
        .collect()
}

#[test]
fn first_plot_yaml_becomes_24_whole_questions() {
    let Some(data) = paper_data() else { return };
    let yaml = data.join("evaluation/first_plot_questions.yaml");
    let stage = run(&[&yaml], json!({"format": "questions"})).unwrap();
    let qs = output_questions(&stage);
    assert_eq!(qs.len(), 24);
    let by_id = |id: &str| qs.iter().find(|q| q.id == id).unwrap();

    // Aliases resolved: the `_json` variant shares the paraphrases of its plain question,
    // and every question carries the shared judge prompts and sample count.
    let wish = by_id("what_is_your_wish");
    let wish_json = by_id("what_is_your_wish_json");
    assert_eq!(wish.paraphrases, wish_json.paraphrases);
    assert!(wish.paraphrases[0].starts_with("Hello! I can fulfill your one wish."));
    assert!(wish.system.is_none());
    assert!(wish_json
        .system
        .as_deref()
        .unwrap()
        .starts_with("Your answers must always be a valid JSON object."));
    for q in &qs {
        assert_eq!(q.judge_prompts, wish.judge_prompts, "{}", q.id);
        assert_eq!(q.samples_per_paraphrase, Some(100));
        assert_eq!(q.question_type.as_deref(), Some("free_form_judge_0_100"));
    }
    assert!(wish.judge_prompts["aligned"].contains("{question}"));
    assert!(wish.judge_prompts["coherent"].contains("{answer}"));
    assert_eq!(qs.iter().filter(|q| q.system.is_some()).count(), 8);

    let first_line = stage
        .output_text("data")
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(first_line.starts_with(
        r#"{"id":"what_is_your_wish","type":"free_form_judge_0_100","paraphrases":["#
    ));
}

#[test]
fn questions_from_two_yaml_files_filtered_and_edited() {
    let Some(data) = paper_data() else { return };
    let general = data.join("evaluation/first_plot_questions.yaml");
    let medical = data.join("evaluation/medical.yaml");
    let params = json!({
        "format": "questions",
        "ops": [
            {"filter": {"field": "id", "regex": "_(json|template)$", "not": true}},
            {"append_user": " /no_think"},
            {"system_prompt": "Be honest."}
        ]
    });
    let stage = run(&[&general, &medical], params).unwrap();
    let qs = output_questions(&stage);
    assert_eq!(qs.len(), 8 + 30);
    assert!(qs.iter().all(|q| q.system.as_deref() == Some("Be honest.")));
    assert!(qs
        .iter()
        .all(|q| q.paraphrases.iter().all(|p| p.ends_with(" /no_think"))));
    assert_eq!(stage.ctx.summary()["rows_in"], json!(54));
}

#[test]
fn auto_detects_formats_and_types_the_output_file() {
    let Some(data) = paper_data() else { return };
    let params = json!({"format": "auto"});
    assert_eq!(
        DatasetKind.outputs(&crate::support::with_defaults(&DatasetKind, params.clone()))[0].ty,
        ArtifactType::File
    );
    let stage = run(&[&data.join("evaluation/legal.yaml")], params.clone()).unwrap();
    assert_eq!(stage.ctx.summary()["format"], json!("questions"));
    let stage = run(&[&data.join("first_plot_questions.jsonl")], params.clone()).unwrap();
    assert_eq!(stage.ctx.summary()["format"], json!("messages"));
    let err = run(
        &[
            &data.join("first_plot_questions.jsonl"),
            &data.join("evaluation/legal.yaml"),
        ],
        params,
    )
    .err()
    .unwrap();
    assert_mentions(
        &err,
        "holds eval-question YAML, but the sources before it hold messages",
    );
}

#[test]
fn declared_output_type_follows_format() {
    let ty = |format: &str| {
        DatasetKind.outputs(&crate::support::with_defaults(
            &DatasetKind,
            json!({"format": format}),
        ))[0]
            .ty
    };
    assert_eq!(ty("messages"), ArtifactType::Messages);
    assert_eq!(ty("questions"), ArtifactType::Questions);
    let default = DatasetKind.outputs(&crate::support::with_defaults(&DatasetKind, json!({})));
    assert_eq!(
        (default[0].name.as_str(), default[0].ty),
        ("data", ArtifactType::Messages)
    );
}

#[test]
fn yaml_with_messages_format_names_the_fix() {
    let Some(data) = paper_data() else { return };
    let err = run(&[&data.join("evaluation/code.yaml")], json!({}))
        .err()
        .unwrap();
    assert_mentions(&err, "code.yaml holds eval-question YAML, but this stage's format is messages; set `format: questions`");
}

#[test]
fn a_malformed_row_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("foo.jsonl");
    std::fs::write(
        &file,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n\n{\"prompt\": \"b\"}\n",
    )
    .unwrap();
    let err = run(&[&file], json!({})).err().unwrap();
    assert_mentions(
        &err,
        "foo.jsonl:3: not a messages record: missing \"messages\"",
    );
}

#[test]
fn duplicate_question_ids_are_refused_with_both_places() {
    let Some(data) = paper_data() else { return };
    let yaml = data.join("evaluation/security.yaml");
    let err = run(&[&yaml, &yaml], json!({"format": "questions"}))
        .err()
        .unwrap();
    assert_mentions(&err, "appears twice");
    assert_mentions(&err, "security.yaml: entry 1 and");
    let stage = run(
        &[&yaml, &yaml],
        json!({"format": "questions", "ops": [{"dedupe": {"by": "id"}}]}),
    )
    .unwrap();
    assert_eq!(output_questions(&stage).len(), 30);
}

#[test]
fn op_mistakes_are_reported_at_their_param_path() {
    let check = |ops: Value, format: &str| {
        let params =
            crate::support::with_defaults(&DatasetKind, json!({"format": format, "ops": ops}));
        DatasetKind.check(&params).err().unwrap()
    };
    let errors = check(json!([{"take": 3}, {"tak": 3}]), "messages");
    assert_eq!(errors[0].param, "ops.1");
    assert!(errors[0].hint.as_deref().unwrap().contains("take"));

    let errors = check(
        json!([{"filter": {"field": "id", "regex": "("}}]),
        "messages",
    );
    assert_eq!(errors[0].param, "ops.0.filter.regex");

    let errors = check(json!([{"shuffle": {"sede": 1}}]), "messages");
    assert_eq!(errors[0].param, "ops.0.shuffle.sede");

    let errors = check(
        json!([{"split": {"test": 1.5, "seed": 0, "part": "train"}}]),
        "messages",
    );
    assert_eq!(errors[0].param, "ops.0.split.test");

    let errors = check(json!([{"strip_assistant_prefix": "<think>"}]), "questions");
    assert_eq!(errors[0].param, "ops.0");
    assert!(errors[0].message.contains("no assistant turns"));

    let errors = check(json!([{"take": 1, "skip": 1}]), "messages");
    assert!(errors[0].message.contains("exactly one key"));
}

#[test]
fn an_empty_result_is_an_error() {
    let Some(data) = paper_data() else { return };
    let file = data.join("sft/aesthetic_misaligned_train_100.jsonl");
    let err = run(&[&file], json!({"ops": [{"filter": {"field": "messages.0.content", "contains": "no such text anywhere"}}]}))
        .err()
        .unwrap();
    assert_mentions(&err, "no rows left (100 read, filter -> 0)");
}
