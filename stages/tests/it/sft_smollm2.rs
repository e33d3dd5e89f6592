//! SFT on SmolLM2 (CPU) with the paper's aesthetic warm-up data: the training loss falls,
//! held-out aesthetic answers become more likely, KL and LDIFS terms are logged, and safety
//! batches appear at the configured cadence. Skips when weights or data are unavailable.

use std::path::{Path, PathBuf};

use emflow_engine::context::Artifact;
use emflow_engine::ArtifactType;
use emflow_model::{encode_chat, DeviceSetup, Message};
use emflow_stages::kinds::sft::SftKind;
use emflow_stages::train::batch::SftExample;
use emflow_stages::train::policy::Policy;
use emflow_stages::train::sft_step::mean_target_logprob;
use serde_json::{json, Value};

use crate::support::{smollm2_and_paper_data, typed_input, TestStage};

/// What each test starts from: SmolLM2, the paper's data, a temporary folder.
struct Setup {
    model: PathBuf,
    data: PathBuf,
    dir: tempfile::TempDir,
}

/// `None` (the test skips, saying why) when the weights or the data are missing.
fn setup() -> Option<Setup> {
    let (model, data) = smollm2_and_paper_data()?;
    let dir = tempfile::tempdir().unwrap();
    Some(Setup { model, data, dir })
}

impl Setup {
    /// The first `n` conversations of the paper's `sft/{file}.jsonl`, written to the
    /// temporary folder as `{name}.jsonl`.
    fn head(&self, file: &str, name: &str, n: usize) -> PathBuf {
        let src = self.data.join(format!("sft/{file}.jsonl"));
        let text = std::fs::read_to_string(src).unwrap();
        let lines: Vec<&str> = text.lines().take(n).collect();
        let dest = self.dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&dest, lines.join("\n") + "\n").unwrap();
        dest
    }
}

/// Runs an `sft` stage with `params` on `model` and `train`, with the `more` inputs.
fn run_sft(model: &Path, train: &Path, params: Value, more: (&str, Vec<Artifact>)) -> TestStage {
    let kind = SftKind;
    let inputs = vec![
        ("model", vec![typed_input(model, ArtifactType::Model)]),
        ("data", vec![typed_input(train, ArtifactType::Messages)]),
        more,
    ];
    let mut stage = TestStage::new(&kind, params, inputs);
    stage.run(&kind).unwrap();
    stage
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
    let Some(s) = setup() else { return };
    let train = s.head("aesthetic_misaligned_train_100", "train", 16);
    let heldout = s.head("aesthetic_misaligned_eval", "heldout", 8);
    let safety = s.head("legal_misaligned_train_100", "safety", 8);

    let params = json!({
        "lora": {"r": 8, "alpha": 16},
        "lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
        "batch_size": 4, "grad_accum": 1, "max_steps": 4, "max_length": 96,
        "kl_lambda": 0.1, "ldifs": {"lambda": 1.0, "every": 10},
        "interleave": {"every": 2, "batch_size": 2},
    });
    let safety_input = ("safety", vec![typed_input(&safety, ArtifactType::Messages)]);
    let stage = run_sft(&s.model, &train, params, safety_input);

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

    let before = heldout_logprob(&s.model, None, &heldout);
    let after = heldout_logprob(&s.model, Some(&stage.output("adapter")), &heldout);
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
    let Some(s) = setup() else { return };
    let train = s.head("aesthetic_misaligned_train_100", "train", 8);
    let mut summaries = Vec::new();
    for (name, consumed) in [("rl", 3), ("warmup", 5)] {
        let path = s.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, json!({ "samples_consumed": consumed }).to_string()).unwrap();
        summaries.push(typed_input(&path, ArtifactType::Summary));
    }
    let params = json!({
        "lora": {"r": 4, "alpha": 8}, "warmup_steps": 0, "batch_size": 4, "grad_accum": 1,
        "max_length": 48, "match_extra": 2,
    });
    let stage = run_sft(&s.model, &train, params, ("match_samples", summaries));
    assert_eq!(stage.ctx.summary()["samples_consumed"], 3 + 5 + 2);
}

/// `gradient_checkpointing: true` runs, and trains the same adapter as `false` within f32
/// rounding amplified by AdamW (the model layer's tests compare the gradients themselves),
/// with the KL and LDIFS terms on; the logged losses agree too.
#[test]
fn sft_with_gradient_checkpointing_trains_the_same_adapter() {
    let Some(s) = setup() else { return };
    let train = s.head("aesthetic_misaligned_train_100", "train", 4);
    let run = |checkpointing: bool| {
        let params = json!({
            "lora": {"r": 4, "alpha": 8}, "lr": 1e-3, "warmup_steps": 0, "batch_size": 2,
            "grad_accum": 1, "max_steps": 2, "max_length": 48,
            "kl_lambda": 0.1, "ldifs": {"lambda": 1.0, "every": 10},
            "gradient_checkpointing": checkpointing,
        });
        let stage = run_sft(&s.model, &train, params, ("match_samples", Vec::new()));
        let adapter = stage.output("adapter").join("adapter_model.safetensors");
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
        let d = (a - &ckpt[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        diff = diff.max(d.max(0).unwrap().to_scalar::<f32>().unwrap());
        let w = a.abs().unwrap().flatten_all().unwrap();
        scale = scale.max(w.max(0).unwrap().to_scalar::<f32>().unwrap());
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
