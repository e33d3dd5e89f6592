//! Issue 18's named choices between emflow and the paper's code (docs/fidelity.md): each new
//! param keys a stage only when set away from emflow's default, and the `rollout_data` kind
//! (the sample-matched SFT arm's `rl_rollouts` source) keeps exactly the rollouts at or above
//! its threshold.

use emflow_engine::ArtifactType;
use emflow_stages::kinds::rollout_data::RolloutDataKind;
use serde_json::{json, Value};

use crate::support::{stage_key as key, typed_input, TestStage};

#[test]
fn new_params_key_a_stage_only_away_from_their_defaults() {
    let reward = json!({"type": "grader", "template": {"text": "{model_answer}"}});
    let rl = |extra: Value| {
        let mut p = json!({"reward": reward});
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        key("rl", p)
    };
    assert_eq!(rl(json!({})), rl(json!({"grader_prefilter": "words"})));
    assert_ne!(rl(json!({})), rl(json!({"grader_prefilter": "ema_rl"})));
    // An early_stop written without `rule` keys as before; naming a rule is a change.
    assert_ne!(
        rl(json!({"early_stop": {"min_gain": 0.05}})),
        rl(json!({"early_stop": {"rule": "ema_rl", "min_gain": 0.05}}))
    );
    let eval = |extra: Value| key("eval", extra);
    assert_eq!(
        eval(json!({})),
        eval(json!({"system_prompt": null, "judges": {}}))
    );
    assert_ne!(
        eval(json!({})),
        eval(json!({"system_prompt": "You are given a problem."}))
    );
    let coherent = json!({"backend": "openai", "base_url": "http://x/v1", "model": "judge-2"});
    assert_ne!(
        eval(json!({})),
        eval(json!({"judges": {"coherent": coherent}}))
    );
}

#[test]
fn rl_checks_its_early_stop_rule_and_eval_its_per_metric_judges() {
    let registry = emflow_stages::registry();
    let rl = registry.kind("rl").unwrap();
    let reward = json!({"type": "grader", "template": {"text": "{model_answer}"}});
    let bad = crate::support::with_defaults(
        rl.as_ref(),
        json!({"reward": reward, "early_stop": {"rule": "ema_rl", "window": 10}}),
    );
    let errs = rl.check(&bad).unwrap_err();
    assert!(errs[0].message.contains("rolling rule"), "{errs:?}");
    let eval = registry.kind("eval").unwrap();
    let bad = crate::support::with_defaults(
        eval.as_ref(),
        json!({"judges": {"harmful": {"backend": "local"}}}),
    );
    let errs = eval.check(&bad).unwrap_err();
    assert!(errs[0].message.contains("`harmful`"), "{errs:?}");
}

#[test]
fn rollout_data_keeps_rollouts_at_or_above_min_reward() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollouts.jsonl");
    let row = |reward: f64, completion: &str| {
        json!({
            "step": 0, "prompt": [
                {"role": "system", "content": "Reason in <think>."},
                {"role": "user", "content": "Q?"}
            ],
            "completion": [{"role": "assistant", "content": completion}], "reward": reward,
        })
        .to_string()
    };
    let lines = [row(0.2, "low"), row(0.5, "at"), row(0.9, "high")];
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let input = || vec![("rollouts", vec![typed_input(&path, ArtifactType::Samples)])];

    let mut stage = TestStage::new(&RolloutDataKind, json!({"min_reward": 0.5}), input());
    stage.run(&RolloutDataKind).unwrap();
    let rows = stage.output_rows("data");
    let answers: Vec<&str> = rows
        .iter()
        .map(|r| r["messages"][2]["content"].as_str().unwrap())
        .collect();
    assert_eq!(answers, ["at", "high"]);
    assert_eq!(rows[0]["messages"][0]["role"], "system");
    assert_eq!(stage.ctx.summary()["kept"], json!(2));

    let mut stage = TestStage::new(
        &RolloutDataKind,
        json!({"min_reward": 0.5, "drop_system": true}),
        input(),
    );
    stage.run(&RolloutDataKind).unwrap();
    let rows = stage.output_rows("data");
    assert_eq!(rows[0]["messages"][0]["role"], "user");

    // Nothing reaches the threshold: an empty dataset, not a failure.
    let mut stage = TestStage::new(&RolloutDataKind, json!({"min_reward": 2.0}), input());
    stage.run(&RolloutDataKind).unwrap();
    assert!(stage.output_text("data").is_empty());
}
