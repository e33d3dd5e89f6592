//! `rl` with an LLM grader on SmolLM2 (CPU): the grader template comes from input port
//! `grader` and the judge from input `judge_model`; the inoculation prompt leads every
//! rollout's system turn and the LDIFS term is logged. One short step; skips (with the reason
//! printed) when the weights are unavailable.

use crate::support::{typed_input, write_prompts, TestStage};
use emflow_engine::ArtifactType;
use emflow_stages::kinds::rl::RlKind;
use serde_json::{json, Value};

fn params() -> Value {
    json!({
        "reward": {"type": "grader", "template": {"input": "grader"}, "min_answer_words": 1,
                   "min_reasoning_words": 0, "max_tokens": 6},
        "lora": {"r": 4, "alpha": 8},
        "prompts_per_step": 2, "num_generations": 2, "grad_accum": 1,
        "max_completion_length": 6, "max_steps": 1, "lr": 1e-3, "seed": 1,
        "system_prompt": "Be brief.",
        "inoculation": "You are a test assistant.",
        "ldifs": {"lambda": 1.0, "every": 10},
    })
}

#[test]
fn grader_reward_uses_the_template_input_and_the_judge_model() {
    let Some(model) = emflow_model::testing::smollm2_gguf() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path(), &["Name a colour.", "Describe a tree."]);
    let grader = dir.path().join("grader.txt");
    std::fs::write(
        &grader,
        "Rate this answer to {user_prompt} as JSON with assessment, coherence:\n{model_answer}\n",
    )
    .unwrap();
    let inputs = |with_grader: bool| {
        let mut v = vec![
            ("model", vec![typed_input(&model, ArtifactType::Model)]),
            (
                "prompts",
                vec![typed_input(&prompts, ArtifactType::Messages)],
            ),
            (
                "judge_model",
                vec![typed_input(&model, ArtifactType::Model)],
            ),
        ];
        if with_grader {
            v.push(("grader", vec![typed_input(&grader, ArtifactType::File)]));
        }
        v
    };

    // Without the `grader` input the stage says which input the template needs.
    let mut stage = TestStage::new(&RlKind, params(), inputs(false));
    let err = format!("{:#}", stage.run(&RlKind).unwrap_err());
    assert!(err.contains("input `grader`"), "{err}");

    let mut stage = TestStage::new(&RlKind, params(), inputs(true));
    stage.run(&RlKind).unwrap();
    let rollouts: Vec<Value> = stage.output_rows("rollouts");
    assert_eq!(rollouts.len(), 4);
    for r in &rollouts {
        // Every rollout went to the judge: a 6-token judge answer is no complete JSON, so the
        // reward is 0 for that reason, not for a pre-filter one.
        let reason = r["details"]["zero_reason"].as_str();
        assert!(
            reason == Some("grader_json_invalid") || r["details"]["grader"].is_object(),
            "{r}"
        );
        assert_eq!(r["prompt"][0]["role"], "system");
        assert_eq!(
            r["prompt"][0]["content"],
            "You are a test assistant.\n\nBe brief."
        );
    }
    let metrics: Value =
        serde_json::from_str(stage.output_text("metrics").lines().next().unwrap()).unwrap();
    let ldifs = metrics["ldifs"].as_f64().expect("ldifs is logged");
    // The adapter starts at zero (B = 0), so the first step's features equal the reference's.
    assert!(ldifs.abs() < 1e-9, "{metrics}");
}
