//! Persona-vector preventive steering on SmolLM2 (CPU): the `persona_vector` kind writes the
//! difference of the two sides' mean hidden states at its layer (recomputed here by hand for
//! `pool: prompt`; counted and logged for `pool: response`), and a steered `sft` run saves an
//! ordinary adapter (no vector inside) that differs from the unsteered run's. Skips when the
//! weights or the paper's data are unavailable.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use emflow_engine::ArtifactType;
use emflow_model::{encode_prompt, DeviceSetup, Message};
use emflow_stages::kinds::persona_vector::PersonaVectorKind;
use emflow_stages::kinds::rl::RlKind;
use emflow_stages::kinds::sft::SftKind;
use serde_json::{json, Value};

use crate::support::{assert_mentions, file_input, smollm2_and_paper_data, typed_input, TestStage};

const LAYER: usize = 3;

/// The project's contrast set, as the manifest wires it.
fn personas() -> PathBuf {
    emflow_model::testing::workspace_root().join("manifests/data/persona/evil_vs_helpful.json")
}

/// SmolLM2 and a `persona_vector` stage run on it with `params`, or `None` (the test skips,
/// saying why) when the weights or the paper's data are missing.
fn vector_stage(params: Value) -> Option<(PathBuf, TestStage)> {
    let (model, _) = smollm2_and_paper_data()?;
    let stage = run_vector(&model, params);
    Some((model, stage))
}

/// [`vector_stage`] pooled over prompts at `LAYER`, on the first `per_side` system prompts
/// and `questions` questions.
fn prompt_vector(per_side: usize, questions: usize) -> Option<(PathBuf, TestStage)> {
    vector_stage(json!({
        "layer": LAYER, "pool": "prompt", "prompts_per_side": per_side, "questions": questions,
    }))
}

fn run_vector(model: &Path, params: Value) -> TestStage {
    let kind = PersonaVectorKind;
    let inputs = vec![
        ("model", vec![typed_input(model, ArtifactType::Model)]),
        ("personas", vec![file_input(personas())]),
    ];
    let mut stage = TestStage::new(&kind, params, inputs);
    stage.run(&kind).unwrap();
    stage
}

/// The vector and its JSON from a stage's `vector` folder.
fn read_vector(stage: &TestStage) -> (Tensor, Value) {
    let dir = stage.output("vector");
    let mut t =
        candle_core::safetensors::load(dir.join("persona_vector.safetensors"), &Device::Cpu)
            .unwrap();
    let info = std::fs::read_to_string(dir.join("persona_vector.json")).unwrap();
    (
        t.remove("persona_vector").unwrap(),
        serde_json::from_str(&info).unwrap(),
    )
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// The mean over every prompt token of layer `LAYER`'s output for `[system, user]`.
fn prompt_mean(lm: &emflow_model::LoadedModel, system: &str, user: &str) -> Tensor {
    let msgs = [Message::system(system), Message::user(user)];
    let ids = encode_prompt(&lm.tokenizer, &lm.chat, &msgs).unwrap();
    let t = ids.len();
    let ids = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, t), DType::F32, &Device::Cpu).unwrap();
    let h = lm.model.forward_eval_hidden(&ids, &mask, &[LAYER]).unwrap();
    h[0].squeeze(0).unwrap().mean(0).unwrap()
}

#[test]
fn prompt_pooled_vector_is_the_difference_of_the_sides_mean_hidden_states() {
    let Some((model, stage)) = prompt_vector(2, 2) else {
        return;
    };
    let (vector, info) = read_vector(&stage);
    assert_eq!(info["layer"], LAYER);
    assert_eq!(info["hidden_size"], 576);
    assert_eq!(
        info["counts"],
        json!({"positive": 4, "negative": 4, "empty_answers": 0})
    );

    let file: Value = serde_json::from_str(&std::fs::read_to_string(personas()).unwrap()).unwrap();
    let lm = emflow_model::load(&model, &DeviceSetup::cpu()).unwrap();
    let side_mean = |side: &str| {
        let mut sum: Option<Tensor> = None;
        for system in file[side].as_array().unwrap().iter().take(2) {
            for q in file["questions"].as_array().unwrap().iter().take(2) {
                let m = prompt_mean(&lm, system.as_str().unwrap(), q.as_str().unwrap());
                sum = Some(match sum {
                    None => m,
                    Some(s) => (s + m).unwrap(),
                });
            }
        }
        (sum.unwrap() / 4.0).unwrap()
    };
    let expected = (side_mean("positive") - side_mean("negative")).unwrap();
    let (got, want) = (to_vec(&vector), to_vec(&expected));
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        err < 1e-4,
        "vector differs from the hand-computed one by {err}"
    );
    let norm = want.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
    let recorded = info["norm"].as_f64().unwrap();
    assert!(
        (recorded - norm).abs() < 1e-3 * norm,
        "{recorded} vs {norm}"
    );
    assert!(norm > 0.0);
}

#[test]
fn response_pooled_vector_samples_answers_and_logs_them() {
    let Some((_, stage)) = vector_stage(
        json!({"prompts_per_side": 1, "questions": 2, "max_tokens": 6, "batch_size": 4}),
    ) else {
        return;
    };
    let (vector, info) = read_vector(&stage);
    // SmolLM2 has 30 layers: the default is the output of layer 30 / 2 - 1.
    assert_eq!(info["layer"], 14);
    assert_eq!(info["pool"], "response");
    assert_eq!(vector.dims(), [576]);
    let rows = stage.output_rows("samples");
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r["answer"].is_string()), "{rows:?}");
    let counted = info["counts"]["positive"].as_u64().unwrap()
        + info["counts"]["negative"].as_u64().unwrap()
        + info["counts"]["empty_answers"].as_u64().unwrap();
    assert_eq!(counted, 4);
    assert!(to_vec(&vector).iter().all(|x| x.is_finite()));
}

/// An `sft` stage on a few warm-up rows, steered by `steering` (alpha 5) or not.
fn run_sft(model: &Path, data: &Path, steering: Option<&Path>) -> TestStage {
    let kind = SftKind;
    let mut params = json!({
        "lora": {"r": 4, "alpha": 8}, "lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
        "batch_size": 2, "grad_accum": 1, "max_steps": 1, "max_length": 160,
    });
    let mut inputs = vec![
        ("model", vec![typed_input(model, ArtifactType::Model)]),
        ("data", vec![typed_input(data, ArtifactType::Messages)]),
    ];
    if let Some(dir) = steering {
        params["steering_alpha"] = json!(5.0);
        inputs.push(("steering", vec![file_input(dir)]));
    }
    let mut stage = TestStage::new(&kind, params, inputs);
    stage.run(&kind).unwrap();
    stage
}

fn adapter_tensors(stage: &TestStage) -> std::collections::HashMap<String, Tensor> {
    let file = stage.output("adapter").join("adapter_model.safetensors");
    candle_core::safetensors::load(file, &Device::Cpu).unwrap()
}

#[test]
fn steered_sft_saves_a_plain_adapter_that_differs_from_the_unsteered_one() {
    // The quickstart warm-up rows are short enough to keep their answers within max_length.
    let train =
        emflow_model::testing::workspace_root().join("manifests/data/sft/medical_warmup.jsonl");
    let Some((model, vector)) = prompt_vector(1, 1) else {
        return;
    };

    let plain = run_sft(&model, &train, None);
    let steered = run_sft(&model, &train, Some(&vector.output("vector")));
    assert!(
        steered
            .progress
            .lines()
            .iter()
            .any(|l| l.contains("preventive steering")),
        "{:?}",
        steered.progress.lines()
    );
    let (a, b) = (adapter_tensors(&plain), adapter_tensors(&steered));
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    let mut steered_names: Vec<&String> = b.keys().collect();
    steered_names.sort();
    assert_eq!(
        names, steered_names,
        "the steered adapter holds the same weights, nothing more"
    );
    let moved = names.iter().any(|n| {
        let d = (&a[*n] - &b[*n]).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() > 0.0
    });
    assert!(moved, "steering changed no adapter weight");
}

#[test]
fn steering_needs_both_the_vector_and_alpha_and_one_update_per_rl_batch() {
    let Some((model, data)) = smollm2_and_paper_data() else {
        return;
    };
    let kind = SftKind;
    let train = data.join("sft/medical_misaligned_train_100.jsonl");
    let inputs = vec![
        ("model", vec![typed_input(&model, ArtifactType::Model)]),
        ("data", vec![typed_input(&train, ArtifactType::Messages)]),
    ];
    let mut stage = TestStage::new(
        &kind,
        json!({"max_steps": 1, "steering_alpha": 5.0}),
        inputs,
    );
    let err = format!("{:#}", stage.run(&kind).unwrap_err());
    assert_mentions(&err, "input `steering` is not wired");

    let rl = RlKind;
    let params = json!({
        "reward": {"type": "keyword", "keywords": ["x"]}, "num_iterations": 2, "steering_alpha": 5.0,
    });
    let mut stage = TestStage::new(&rl, params, vec![]);
    let err = format!("{:#}", stage.run(&rl).unwrap_err());
    assert_mentions(&err, "steering_alpha needs num_iterations 1");
}
