//! SFT on SmolLM2 (CPU) with the paper's aesthetic warm-up data: the training loss falls,
//! held-out aesthetic answers become more likely, KL and LDIFS terms are logged, and safety
//! batches appear at the configured cadence. Skips when weights or data are unavailable.

use std::path::{Path, PathBuf};

use emflow_engine::{Artifact, ArtifactType};
use emflow_model::{encode_chat, DeviceSetup, Message};
use emflow_stages::kinds::sft::SftKind;
use emflow_stages::train::batch::SftExample;
use emflow_stages::train::policy::Policy;
use emflow_stages::train::sft_step::mean_target_logprob;
use serde_json::{json, Value};

use crate::support::{smollm2_and_paper_data, typed_input, TestStage};

/// The first `n` conversations of a paper file, written to `dest`.
fn head(src: &Path, dest: &Path, skip: usize, n: usize) {
    let text = std::fs::read_to_string(src).unwrap();
    let lines: Vec<&str> = text.lines().skip(skip).take(n).collect();
    std::fs::write(dest, lines.join("\n") + "\n").unwrap();
}

/// SmolLM2, a temporary folder and the first `n` aesthetic training conversations written in
/// it; None (the test skips) when the weights or the paper's data are absent.
fn model_and_train(n: usize) -> Option<(PathBuf, tempfile::TempDir, PathBuf)> {
    let (model, data) = smollm2_and_paper_data()?;
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    head(
        &data.join("sft/aesthetic_misaligned_train_100.jsonl"),
        &train,
        0,
        n,
    );
    Some((model, dir, train))
}

/// The `model` and `data` inputs of an SFT stage.
fn model_and_data(model: &Path, train: &Path) -> Vec<(&'static str, Vec<Artifact>)> {
    vec![
        ("model", vec![typed_input(model, ArtifactType::Model)]),
        ("data", vec![typed_input(train, ArtifactType::Messages)]),
    ]
}

fn heldout_logprob(model: &Path, adapter: Option<&Path>, heldout: &Path) -> f64 {
    let mut lm = emflow_model::load(model, &DeviceSetup::cpu()).unwrap();
    if let Some(a) = adapter {
        lm.model.load_adapter(a).unwrap();
    }
    let mut examples = Vec::new();
    for line in std::fs::read_to_string(heldout).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let msgs: Vec<Message> = serde_json::from_value(v["messages"].clone()).unwrap();
        let enc = encode_chat(&lm.tokenizer, &lm.chat, &msgs).unwrap();
        examples.push(SftExample {
            ids: enc.ids,
            target: enc.assistant_mask,
        });
    }
    let policy = Policy {
        lm,
        vars: Vec::new(),
        full_finetune: false,
    };
    mean_target_logprob(&policy, &examples, 4).unwrap()
}

#[test]
fn sft_on_aesthetic_data_learns_and_logs_regularisers_and_safety_batches() {
    let Some((model, data)) = smollm2_and_paper_data() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    let heldout = dir.path().join("heldout.jsonl");
    let safety = dir.path().join("safety.jsonl");
    head(
        &data.join("sft/aesthetic_misaligned_train_100.jsonl"),
        &train,
        0,
        16,
    );
    head(
        &data.join("sft/aesthetic_misaligned_eval.jsonl"),
        &heldout,
        0,
        8,
    );
    head(
        &data.join("sft/legal_misaligned_train_100.jsonl"),
        &safety,
        0,
        8,
    );

    let kind = SftKind;
    let params = json!({
        "lora": {"r": 8, "alpha": 16},
        "lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
        "batch_size": 4, "grad_accum": 1, "max_steps": 4, "max_length": 96,
        "kl_lambda": 0.1, "ldifs": {"lambda": 1.0, "every": 10},
        "interleave": {"every": 2, "batch_size": 2},
    });
    let mut stage = TestStage::new(
        &kind,
        params,
        [
            model_and_data(&model, &train),
            vec![("safety", vec![typed_input(&safety, ArtifactType::Messages)])],
        ]
        .concat(),
    );
    stage.run(&kind).unwrap();

    let rows: Vec<Value> = stage.output_rows("metrics");
    let kinds: Vec<&str> = rows.iter().map(|r| r["batch"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["main", "main", "safety", "main", "main", "safety"]);
    let main: Vec<&Value> = rows.iter().filter(|r| r["batch"] == "main").collect();
    assert!(
        main.iter()
            .all(|r| r["kl"].is_number() && r["ldifs"].is_number()),
        "{main:?}"
    );
    // KL and LDIFS start at zero (fresh adapter = reference) and grow as the adapter learns.
    assert!(
        main[0]["kl"].as_f64().unwrap().abs() < 1e-4,
        "{}",
        main[0]["kl"]
    );
    assert!(main[3]["kl"].as_f64().unwrap() > 0.0);
    let first = main[0]["nll"].as_f64().unwrap();
    let last = main[3]["nll"].as_f64().unwrap();
    assert!(
        last < first,
        "training loss did not fall: {first} -> {last}"
    );
    assert_eq!(stage.ctx.summary()["samples_consumed"], 16);

    let before = heldout_logprob(&model, None, &heldout);
    let after = heldout_logprob(&model, Some(&stage.output("adapter")), &heldout);
    eprintln!("held-out mean logprob per answer token: {before:.4} -> {after:.4}");
    assert!(
        after > before,
        "held-out answers did not become more likely: {before} -> {after}"
    );
}

/// The sample-matched arm trains on the sum of what its matched stages consumed (the GRPO
/// arm's prompts and its warm-up's examples) plus `match_extra`.
#[test]
fn matched_sft_consumes_the_sum_of_every_matched_summary() {
    let Some((model, dir, train)) = model_and_train(8) else {
        return;
    };
    let mut summaries = Vec::new();
    for (name, consumed) in [("rl", 3), ("warmup", 5)] {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, json!({ "samples_consumed": consumed }).to_string()).unwrap();
        summaries.push(typed_input(&path, ArtifactType::Summary));
    }
    let kind = SftKind;
    let params = json!({
        "lora": {"r": 4, "alpha": 8}, "warmup_steps": 0, "batch_size": 4, "grad_accum": 1,
        "max_length": 48, "match_extra": 2,
    });
    let mut stage = TestStage::new(
        &kind,
        params,
        vec![
            ("model", vec![typed_input(&model, ArtifactType::Model)]),
            ("data", vec![typed_input(&train, ArtifactType::Messages)]),
            ("match_samples", summaries),
        ],
    );
    stage.run(&kind).unwrap();
    assert_eq!(stage.ctx.summary()["samples_consumed"], 3 + 5 + 2);
}

/// `gradient_checkpointing: true` runs, and trains the same adapter as `false` within f32
/// rounding amplified by AdamW (the model layer's tests compare the gradients themselves), with the KL and
/// LDIFS terms on; the logged losses agree too.
#[test]
fn sft_with_gradient_checkpointing_trains_the_same_adapter() {
    let Some((model, _dir, train)) = model_and_train(4) else {
        return;
    };
    let kind = SftKind;
    let run = |checkpointing: bool| {
        let params = json!({
            "lora": {"r": 4, "alpha": 8}, "lr": 1e-3, "warmup_steps": 0, "batch_size": 2,
            "grad_accum": 1, "max_steps": 2, "max_length": 48,
            "kl_lambda": 0.1, "ldifs": {"lambda": 1.0, "every": 10},
            "gradient_checkpointing": checkpointing,
        });
        let mut stage = TestStage::new(&kind, params, model_and_data(&model, &train));
        stage.run(&kind).unwrap();
        let adapter = stage.output("adapter").join("adapter_model.safetensors");
        eprintln!(
            "gradient_checkpointing {checkpointing}: adapter digest {}",
            crate::support::digest(&adapter)
        );
        let weights = candle_core::safetensors::load(adapter, &candle_core::Device::Cpu).unwrap();
        let losses: Vec<f64> = stage
            .output_rows("metrics")
            .iter()
            .map(|r| r["loss"].as_f64().unwrap())
            .collect();
        (weights, losses)
    };
    let (plain, plain_losses) = run(false);
    let (ckpt, ckpt_losses) = run(true);
    assert_eq!(plain.len(), ckpt.len());
    let (mut diff, mut scale) = (0f32, 0f32);
    for (name, a) in &plain {
        let b = &ckpt[name];
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        diff = diff.max(d.max(0).unwrap().to_scalar::<f32>().unwrap());
        let s = a.abs().unwrap().flatten_all().unwrap();
        scale = scale.max(s.max(0).unwrap().to_scalar::<f32>().unwrap());
    }
    eprintln!(
        "adapter with vs without checkpointing: max |diff| {diff:.3e}, max |weight| {scale:.3e}; losses {plain_losses:?} vs {ckpt_losses:?}"
    );
    // Looser than the gradients' 1e-5: AdamW divides each gradient by its own running size,
    // so where a gradient is near zero its rounding becomes a visible part of the update
    // (measured: 1.4e-6 of 4.2e-2, the step's lr being 1e-3).
    assert!(
        diff <= 1e-4 * scale,
        "adapters differ by {diff} (max {scale})"
    );
    for (a, b) in plain_losses.iter().zip(&ckpt_losses) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
    }
}
