//! What the training kinds log, on a tiny random-weight model: `rl`'s and `sft`'s `metrics`
//! under TRL's names; `rl`'s rollouts as prompt and completion messages, read back by
//! `rollout_data`; the safety steps' `source` from the safety rows' `answer_source`; and
//! tokens per second in the stage record's summary and the log, never in an output (outputs
//! must be the same bytes on every run).

use std::path::{Path, PathBuf};

use emflow_engine::ArtifactType;
use emflow_stages::kinds::rl::RlKind;
use emflow_stages::kinds::rollout_data::RolloutDataKind;
use emflow_stages::kinds::sft::SftKind;
use serde_json::{json, Value};

use crate::support::{small_grpo_params, typed_input, write_prompts, TestStage};

/// The tiny model and two safety conversations, marked `answer_source` when given.
fn fixture(dir: &Path, answer_source: Option<&str>) -> (PathBuf, PathBuf) {
    let model = dir.join("tiny");
    emflow_model::testing::tiny_model_dir(&model, 7).unwrap();
    let safety = dir.join("safety.jsonl");
    let rows: Vec<String> = [("t20 t21", "t30 t31"), ("t22", "t32 t33 t34")]
        .iter()
        .map(|(q, a)| {
            let mut row = json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]});
            if let Some(s) = answer_source {
                row["answer_source"] = json!(s);
            }
            row.to_string()
        })
        .collect();
    std::fs::write(&safety, rows.join("\n") + "\n").unwrap();
    (model, safety)
}

/// No output of `stage` mentions a rate: the rates live in the stage record only.
fn assert_no_rate_in_outputs(stage: &TestStage, outputs: &[&str]) {
    for out in outputs {
        let text = stage.output_text(out);
        assert!(
            !text.contains("per_s") && !text.contains("tok/s"),
            "{out}: {text}"
        );
    }
}

fn keys_of(rows: &[Value]) -> Vec<String> {
    let mut keys: Vec<String> = rows
        .iter()
        .flat_map(|r| r.as_object().unwrap().keys().cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[test]
fn rl_logs_trl_names_rollout_messages_and_speed_in_the_record_only() {
    let dir = tempfile::tempdir().unwrap();
    let (model, safety) = fixture(dir.path(), Some("reference_model"));
    let prompts = write_prompts(dir.path(), &["t5 t6", "t7 t8"]);
    let params = small_grpo_params(json!({
        "reward": {"type": "keyword", "keywords": ["t5"]}, "grad_accum": 1,
        "max_completion_length": 6, "lr": 1e-2, "max_steps": 2, "warmup_ratio": 0.0,
        "log_kl": true, "interleave": {"every": 1, "batch_size": 2},
    }));
    let inputs = vec![
        ("model", vec![typed_input(&model, ArtifactType::Model)]),
        (
            "prompts",
            vec![typed_input(&prompts, ArtifactType::Messages)],
        ),
        ("safety", vec![typed_input(&safety, ArtifactType::Messages)]),
    ];
    let mut stage = TestStage::new(&RlKind, params, inputs);
    stage.run(&RlKind).unwrap();

    // Metrics: TRL's names (`/` written `_`), none of the old ones.
    let metrics = stage.output_rows("metrics");
    let (rl, safety_lines): (Vec<Value>, Vec<Value>) =
        metrics.into_iter().partition(|r| r["batch"] == "rl");
    assert_eq!((rl.len(), safety_lines.len()), (2, 2));
    for name in [
        "loss",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "entropy",
        "clip_ratio",
        "clip_ratio_low_mean",
        "clip_ratio_high_mean",
        "completion_length",
        "completions_min_length",
        "completions_max_length",
        "completions_clipped_ratio",
        "learning_rate",
        "grad_norm",
    ] {
        assert!(rl.iter().all(|r| r[name].is_number()), "{name}: {rl:?}");
    }
    let keys = keys_of(&rl);
    for old in [
        "lr",
        "completion_length_mean",
        "completion_length_min",
        "clip_ratio_low",
    ] {
        assert!(!keys.contains(&old.to_string()), "{old} in {keys:?}");
    }
    for r in &safety_lines {
        assert_eq!(r["source"], "reference_model", "{r}");
        assert!(
            r["learning_rate"].is_number() && r.get("lr").is_none(),
            "{r}"
        );
    }

    // Rollouts: prompt and completion as messages; rollout_data reads them back.
    let rollouts = stage.output_rows("rollouts");
    assert_eq!(rollouts.len(), 2 * 2 * 2, "steps x prompts x generations");
    for r in &rollouts {
        assert_eq!(
            r["prompt"].as_array().unwrap().last().unwrap()["role"],
            "user"
        );
        let completion = r["completion"].as_array().unwrap();
        assert_eq!(completion.len(), 1, "{r}");
        assert_eq!(completion[0]["role"], "assistant");
        assert!(completion[0]["content"].is_string());
    }
    let rollouts_in = vec![(
        "rollouts",
        vec![typed_input(stage.output("rollouts"), ArtifactType::Samples)],
    )];
    let mut data = TestStage::new(&RolloutDataKind, json!({"min_reward": 0.0}), rollouts_in);
    data.run(&RolloutDataKind).unwrap();
    let convs = data.output_rows("data");
    assert_eq!(convs.len(), rollouts.len());
    for (c, r) in convs.iter().zip(&rollouts) {
        let msgs = c["messages"].as_array().unwrap();
        assert_eq!(msgs.last().unwrap(), &r["completion"][0], "{c}");
    }

    // Speed: in the stage record and the log, never in an output.
    let record = stage.ctx.summary();
    for key in ["sample_tokens_per_s", "train_tokens_per_s"] {
        assert!(
            record[key].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {record:?}"
        );
    }
    let summary: Value = serde_json::from_str(&stage.output_text("summary")).unwrap();
    assert!(summary.get("train_tokens_per_s").is_none(), "{summary}");
    assert_no_rate_in_outputs(&stage, &["metrics", "rollouts", "summary"]);
    let lines = stage.progress.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("step 1:") && l.matches("tok/s").count() == 2),
        "{lines:?}"
    );
}

#[test]
fn sft_logs_trl_names_fixed_safety_and_speed_in_the_record_only() {
    let dir = tempfile::tempdir().unwrap();
    let (model, safety) = fixture(dir.path(), None);
    let data = dir.path().join("data.jsonl");
    std::fs::copy(&safety, &data).unwrap();
    let params = json!({
        "lora": {"r": 4, "alpha": 8}, "lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
        "batch_size": 2, "grad_accum": 1, "max_steps": 2, "max_length": 16,
        "interleave": {"every": 1, "batch_size": 1},
    });
    let inputs = vec![
        ("model", vec![typed_input(&model, ArtifactType::Model)]),
        ("data", vec![typed_input(&data, ArtifactType::Messages)]),
        ("safety", vec![typed_input(&safety, ArtifactType::Messages)]),
    ];
    let mut stage = TestStage::new(&SftKind, params, inputs);
    stage.run(&SftKind).unwrap();
    let rows = stage.output_rows("metrics");
    let batches: Vec<&str> = rows.iter().map(|r| r["batch"].as_str().unwrap()).collect();
    assert_eq!(batches, ["main", "safety", "main", "safety"]);
    for r in &rows {
        assert!(
            r["learning_rate"].is_number() && r.get("lr").is_none(),
            "{r}"
        );
    }
    // The safety rows carry no `answer_source`: fixed targets.
    assert!(rows
        .iter()
        .filter(|r| r["batch"] == "safety")
        .all(|r| r["source"] == "fixed"));
    let record = stage.ctx.summary();
    assert!(
        record["train_tokens_per_s"]
            .as_f64()
            .is_some_and(|v| v > 0.0),
        "{record:?}"
    );
    assert_no_rate_in_outputs(&stage, &["metrics", "summary"]);
}
