//! The eval's summary says how its numbers were made: the stage key's parts (every input's
//! digest, the params) less the emflow version, and the judge of each metric; the report
//! recomputes the stage key from them. A judge's connection settings are in none of it: the
//! same eval against a judge server on another port, with other timeouts and concurrency,
//! writes the same summary bytes.
//!
//! A tiny random-weight model answers (milliseconds); the judge is a scripted OpenAI-compatible
//! server on loopback.

use std::path::Path;

use emflow_engine::context::Artifact;
use emflow_engine::ArtifactType;
use emflow_stages::evaluation::Summary;
use emflow_stages::judge::scripted::{Reply, ScriptedServer};
use emflow_stages::kinds::eval::EvalKind;
use serde_json::{json, Value};

use crate::support::TestStage;

/// A model folder and a one-question file in `dir`, wired with distinct digests.
fn inputs(dir: &Path) -> Vec<(&'static str, Vec<Artifact>)> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    emflow_model::testing::tiny_model_dir(&model, 3).unwrap();
    let questions = dir.join("questions.jsonl");
    let q = json!({"id": "q1", "paraphrases": ["t5 t6"], "judge_prompts": {
        "aligned": "Q {question} A {answer} aligned?", "coherent": "Q {question} A {answer} coherent?"}});
    std::fs::write(&questions, format!("{q}\n")).unwrap();
    let art = |path: &Path, ty, digest: &str| Artifact {
        path: path.to_path_buf(),
        digest: digest.into(),
        ty,
        origin: format!("file:{}", path.display()),
    };
    vec![
        (
            "model",
            vec![art(&model, ArtifactType::Model, &"a".repeat(64))],
        ),
        (
            "questions",
            vec![art(&questions, ArtifactType::Questions, &"b".repeat(64))],
        ),
    ]
}

/// Runs the eval with `judge` (an openai judge on `server`, `connection` added) and returns
/// the summary's bytes and the stage's key.
fn eval_summary(dir: &Path, server: &ScriptedServer, connection: Value) -> (String, String) {
    let mut judge =
        json!({"backend": "openai", "base_url": server.base_url(), "model": "judge-7b"});
    judge
        .as_object_mut()
        .unwrap()
        .extend(connection.as_object().unwrap().clone());
    let params = json!({"samples_per_question": 2, "max_tokens": 3, "bootstrap_resamples": 20,
        "judge": judge, "judges": {"coherent": {"backend": "openai", "base_url": server.base_url(),
        "model": "coherence-judge", "score_mode": "text"}}});
    let mut stage = TestStage::new(&EvalKind, params, inputs(dir));
    stage.run(&EvalKind).unwrap();
    (stage.output_text("summary"), stage.ctx.key().to_string())
}

#[test]
fn the_summary_records_key_parts_inputs_and_judges_and_no_connection_setting() {
    let tmp = tempfile::tempdir().unwrap();
    // Scores 40 on log-probabilities; the text-mode judge reads the same content as "40".
    let (a, b) = (
        ScriptedServer::start(vec![Reply::scored(40)]).unwrap(),
        ScriptedServer::start(vec![Reply::scored(40)]).unwrap(),
    );
    let (text, key) = eval_summary(&tmp.path().join("a"), &a, json!({}));
    let moved = json!({"timeout_s": 7.0, "concurrency": 3, "max_retries": 0});
    let (again, key_again) = eval_summary(&tmp.path().join("b"), &b, moved);
    assert_ne!(a.base_url(), b.base_url());
    assert!(b.requests() > 0, "the second eval asked its own server");
    assert_eq!(key, key_again, "connection settings are not in the key");
    assert_eq!(text, again, "nor in the summary's bytes");
    assert!(
        !text.contains("127.0.0.1") && !text.contains("timeout_s"),
        "{text}"
    );

    let summary: Summary = serde_json::from_str(&text).unwrap();
    let p = summary.provenance.expect("the summary's provenance");
    assert_eq!(p.stage_key().as_deref(), Some(key.as_str()));
    assert_eq!(p.kind_version(), Some(2));
    assert_eq!(p.input("model"), vec!["a".repeat(64).as_str()]);
    assert_eq!(p.input("questions"), vec!["b".repeat(64).as_str()]);
    assert_eq!(p.ports(), vec!["model", "questions"]);
    assert!(
        p.key_parts["env"].get("emflow").is_none(),
        "{:?}",
        p.key_parts
    );
    assert_eq!(p.key_parts["params"]["samples_per_question"], 2);
    let judges: Vec<String> = p.judges.values().map(|j| j.short()).collect();
    assert_eq!(
        judges,
        [
            "openai judge-7b (logprobs)",
            "openai coherence-judge (text)"
        ],
        "aligned, then coherent: {:?}",
        p.judges
    );
}
