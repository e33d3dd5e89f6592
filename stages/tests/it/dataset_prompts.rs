//! The dataset kind on prompt sets that are not chat records (issue 18, item 1), on hand-made
//! files: plain lines, JSONL with a prompt field, a folder source, and the ops that number,
//! split (near-duplicates kept together, the split recorded), answer from templates and turn
//! prompts into eval questions.

use std::path::Path;

use emflow_engine::{ArtifactType, Kind};
use emflow_stages::kinds::dataset::near_dup::near_duplicates;
use emflow_stages::kinds::dataset::DatasetKind;
use serde_json::{json, Value};

use crate::support::{assert_mentions, file_input, typed_input, TestStage};

fn run(
    params: Value,
    inputs: Vec<(&str, Vec<emflow_engine::context::Artifact>)>,
) -> anyhow::Result<Vec<Value>> {
    let mut stage = TestStage::new(&DatasetKind, params, inputs);
    stage.run(&DatasetKind)?;
    Ok(stage
        .output_text("data")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect())
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn lines_and_prompt_fields_read_as_user_turns_from_files_and_folders() {
    let dir = tempfile::tempdir().unwrap();
    let lines = write(
        dir.path(),
        "behaviours.txt",
        "Do one thing\n\n  Do another thing  \n",
    );
    let folder = dir.path().join("sets");
    write(
        &folder,
        "b.jsonl",
        "{\"prompt\": \"second file\", \"intents\": [\"x\"]}\n",
    );
    write(&folder, "a.jsonl", "{\"prompt\": \"first file\"}\n");
    let got = run(
        json!({"lines": true, "ops": [{"number": {"field": "id", "prefix": "hb-"}}]}),
        vec![("source", vec![file_input(&lines)])],
    )
    .unwrap();
    assert_eq!(
        got,
        [
            json!({"messages": [{"role": "user", "content": "Do one thing"}], "id": "hb-1"}),
            json!({"messages": [{"role": "user", "content": "Do another thing"}], "id": "hb-2"}),
        ]
    );
    // A folder (as a `pip:` wheel member folder arrives) is its files in path order.
    let got = run(
        json!({"prompt_field": "prompt"}),
        vec![("source", vec![typed_input(&folder, ArtifactType::Model)])],
    )
    .unwrap();
    assert_eq!(got[0]["messages"][0]["content"], "first file");
    assert_eq!(got[1]["messages"][0]["content"], "second file");
    assert_eq!(got[1]["intents"], json!(["x"]), "other fields are kept");
    let err = run(
        json!({"prompt_field": "question"}),
        vec![("source", vec![typed_input(&folder, ArtifactType::Model)])],
    )
    .unwrap_err();
    assert_mentions(
        &format!("{err:#}"),
        "a.jsonl:1: the record has no `question`",
    );
}

#[test]
fn mark_split_keeps_near_duplicates_on_one_side_and_records_the_split() {
    let dir = tempfile::tempdir().unwrap();
    // Pairs of near-duplicates (one shared 8-word run, other case and punctuation) among
    // distinct prompts.
    let mut text = String::new();
    for i in 0..40 {
        // Every 8-word run holds a word of this prompt's own (topicI, itemI).
        text.push_str(&format!(
            "Tell me about topic{i} and whether item{i} is safe for person{i}\n"
        ));
        if i % 4 == 0 {
            text.push_str(&format!(
                "PLEASE tell me about topic{i} and whether item{i} is safe, for person{i}!\n"
            ));
        }
    }
    let source = write(dir.path(), "p.txt", &text);
    let params = |seed: u64| {
        json!({"lines": true, "ops": [
            {"number": {"field": "id"}},
            {"mark_split": {"test": 0.25, "seed": seed}}
        ]})
    };
    let rows = run(params(0), vec![("source", vec![file_input(&source)])]).unwrap();
    assert_eq!(rows.len(), 50);
    let side = |part: &str| -> Vec<&Value> {
        rows.iter().filter(|r| r["split"]["part"] == part).collect()
    };
    let (test, train) = (side("test"), side("train"));
    assert_eq!(test.len(), 13, "round(0.25 x 50) rows, whole groups");
    assert_eq!(test.len() + train.len(), 50);
    for t in &test {
        for r in &train {
            let (a, b) = (
                t["messages"][0]["content"].as_str().unwrap(),
                r["messages"][0]["content"].as_str().unwrap(),
            );
            assert!(!near_duplicates(a, b, 8), "{a} | {b}");
        }
    }
    assert!(rows
        .iter()
        .all(|r| r["split"]["seed"] == 0 && r["split"]["group"].is_u64()));
    let other = run(params(1), vec![("source", vec![file_input(&source)])]).unwrap();
    assert_ne!(rows, other, "the seed decides the split");
}

#[test]
fn template_replies_and_questions_draw_on_the_template_input() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write(dir.path(), "p.txt", "first prompt\nsecond prompt\n");
    let replies = write(
        dir.path(),
        "replies.txt",
        "No.\n\nI can't help with that.\n",
    );
    let params = json!({"lines": true, "ops": [{"template_reply": {"seed": 0}}]});
    let rows = run(
        params.clone(),
        vec![
            ("source", vec![file_input(&prompts)]),
            ("template", vec![file_input(&replies)]),
        ],
    )
    .unwrap();
    for r in &rows {
        assert_eq!(r["messages"][1]["role"], "assistant");
        let reply = r["messages"][1]["content"].as_str().unwrap();
        assert!(
            reply == "No." || reply == "I can't help with that.",
            "{reply}"
        );
    }
    let unwired = run(params, vec![("source", vec![file_input(&prompts)])]).unwrap_err();
    assert_mentions(
        &format!("{unwired:#}"),
        "`template` input, which is not wired",
    );

    let general = write(
        dir.path(),
        "general.yaml",
        "- id: q\n  paraphrases: [hi]\n  judge_prompts: {aligned: 'a {question} {answer} REFUSAL', coherent: 'c {answer}'}\n",
    );
    let questions = run(
        json!({"lines": true, "format": "questions", "ops": [
            {"number": {"field": "id", "prefix": "held-"}},
            {"to_questions": {"id": "id"}}
        ]}),
        vec![
            ("source", vec![file_input(&prompts)]),
            ("template", vec![file_input(&general)]),
        ],
    )
    .unwrap();
    assert_eq!(
        questions[1],
        json!({"id": "held-2", "paraphrases": ["second prompt"],
               "judge_prompts": {"aligned": "a {question} {answer} REFUSAL", "coherent": "c {answer}"}})
    );
}

#[test]
fn readers_and_conversions_that_do_not_fit_the_format_are_refused_at_plan_time() {
    let check = |params: Value| -> String {
        let p = serde_json::from_value(params).unwrap();
        let errors = DatasetKind.check(&p).unwrap_err();
        errors
            .iter()
            .map(|e| format!("{}: {}", e.param, e.message))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_mentions(
        &check(json!({"lines": true, "prompt_field": "p"})),
        "not both",
    );
    assert_mentions(
        &check(json!({"lines": true, "format": "questions"})),
        "reads prompts as messages",
    );
    assert_mentions(
        &check(json!({"format": "messages", "ops": [{"to_questions": {"id": "id"}}]})),
        "the ops end with questions rows but `format` is messages",
    );
    assert_mentions(
        &check(json!({"format": "questions", "ops": [{"mark_split": {"test": 0.5, "seed": 0}}]})),
        "mark_split applies to messages",
    );
}
