//! The paper's architectures (Qwen3, Phi-3/Phi-4, Llama 3.x with llama3 RoPE) against the
//! reference implementation: tiny random-weight models saved by transformers 5.24 as sharded
//! safetensors (`tests/fixtures/<arch>/{f32,bf16}`, made by `tests/fixtures/make_fixtures.py`)
//! with the logits, LoRA logits, loss and LoRA gradients transformers and PEFT computed.
//!
//! Tolerances: f32 logits and LoRA logits within 1e-4 absolute (the bar); bf16 logits
//! within 1e-2 (the bf16 checkpoint computed in f32 here, as emflow does on the CPU, against
//! transformers computing in bf16, whose activations round to 8 bits of mantissa per op;
//! measured 3e-3 to 5e-3); the LoRA loss within 1e-5; each LoRA gradient within 1e-4 of the
//! largest gradient of its tensor (measured 3e-6 to 1.5e-5).
//!
//! Phi-3 also checks that an adapter emflow trains saves under PEFT's fused names and shapes.
//! With `EMFLOW_PEFT_ROUNDTRIP_OUT=DIR`, that test also writes the adapter, the input ids and
//! emflow's logits with it into DIR, for `tests/fixtures/check_peft_roundtrip.py` to compare
//! with PEFT on transformers' Phi-3.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};

use emflow_model::weights::{adapter, hf};
use emflow_model::{AdamW, AdamWConfig, Arch, LoraConfig, Transformer};

use crate::common::{cpu, max_abs_diff};

const ARCHS: [&str; 3] = ["qwen3", "phi3", "llama3"];

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(arch)
}

fn reference(arch: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(arch).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The checkpoint in `fixtures/<arch>/<dtype>` through the HF folder loader, on the CPU.
fn load(arch: &str, dtype: &str) -> Transformer {
    let w = hf::read(&fixture(arch).join(dtype), &cpu()).unwrap();
    Transformer::from_tensors(w.config, w.tensors, &cpu()).unwrap()
}

/// The reference batch (2 x 12 token ids) and an all-ones mask.
fn batch(reference: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = Tensor::ones(ids.dims(), DType::U32, &Device::Cpu).unwrap();
    (ids, mask)
}

/// Mean next-token cross-entropy of `logits` (b, t, vocab) on `ids`, as the fixture's loss.
fn next_token_loss(logits: &Tensor, ids: &Tensor) -> Tensor {
    let (b, t, v) = logits.dims3().unwrap();
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1).unwrap(), D::Minus1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let targets = ids
        .narrow(1, 1, t - 1)
        .unwrap()
        .reshape((b * (t - 1), 1))
        .unwrap();
    logp.gather(&targets, 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap()
}

#[test]
fn f32_logits_match_transformers() {
    for arch in ARCHS {
        let r = reference(arch);
        let (ids, mask) = batch(&r);
        let model = load(arch, "f32");
        let eval = max_abs_diff(&model.forward_eval(&ids, &mask).unwrap(), &r["logits_f32"]);
        let train = max_abs_diff(&model.forward_train(&ids, &mask).unwrap(), &r["logits_f32"]);
        println!("{arch} f32: eval {eval:.2e}, train {train:.2e}");
        assert!(
            eval < 1e-4 && train < 1e-4,
            "{arch}: eval {eval}, train {train}"
        );
    }
}

#[test]
fn bf16_checkpoints_load_and_match_transformers_in_bf16() {
    for arch in ARCHS {
        let r = reference(arch);
        let (ids, mask) = batch(&r);
        let diff = max_abs_diff(
            &load(arch, "bf16").forward_eval(&ids, &mask).unwrap(),
            &r["logits_bf16"],
        );
        println!("{arch} bf16: {diff:.2e}");
        assert!(diff < 1e-2, "{arch}: {diff}");
    }
}

#[test]
fn peft_adapters_give_peft_logits_loss_and_gradients() {
    for arch in ARCHS {
        let r = reference(arch);
        let (ids, mask) = batch(&r);
        let mut model = load(arch, "f32");
        model.load_adapter(&fixture(arch).join("adapter")).unwrap();
        let logits = model.forward_train(&ids, &mask).unwrap();
        let logit_diff = max_abs_diff(&logits, &r["logits_lora"]);
        let loss = next_token_loss(&logits, &ids);
        let loss_diff = max_abs_diff(&loss.reshape(1).unwrap(), &r["loss_lora"]);
        let grads = loss.backward().unwrap();
        let vars = model.trainable_vars();
        let expected: BTreeSet<&str> = r.keys().filter_map(|k| k.strip_prefix("grad.")).collect();
        let ours: BTreeSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(ours, expected, "{arch}: LoRA tensors");
        let mut worst = 0f32;
        for (name, var) in &vars {
            let reference = &r[&format!("grad.{name}")];
            let scale = reference.abs().unwrap().max_all().unwrap();
            let scale = scale.to_scalar::<f32>().unwrap().max(1e-12);
            let g = grads.get(var).unwrap();
            worst = worst.max(max_abs_diff(g, reference) / scale);
        }
        println!("{arch} LoRA: logits {logit_diff:.2e}, loss {loss_diff:.2e}, gradients {worst:.2e} (relative)");
        assert!(logit_diff < 1e-4, "{arch}: LoRA logits {logit_diff}");
        assert!(loss_diff < 1e-5, "{arch}: LoRA loss {loss_diff}");
        assert!(
            worst < 1e-4,
            "{arch}: LoRA gradients {worst} of their largest"
        );
    }
}

#[test]
fn transformers5_rope_parameters_give_the_right_theta() {
    let theta = |arch: &str| hf::read_config(&fixture(arch).join("f32")).unwrap();
    assert_eq!(theta("qwen3").rope_theta, 1e6);
    assert_eq!(theta("phi3").rope_theta, 250_000.0);
    let llama = theta("llama3");
    assert_eq!(llama.rope_theta, 500_000.0);
    let scaling = llama.rope_scaling.expect("llama3 rope scaling");
    assert_eq!((scaling.factor, scaling.original_max_position), (8.0, 8));
    let qwen3 = theta("qwen3");
    assert_eq!((qwen3.arch, qwen3.head_dim), (Arch::Qwen3, 24));
    assert_eq!(theta("phi3").arch, Arch::Phi3);
}

/// A change to a parsed config.json.
type ConfigEdit = dyn Fn(&mut serde_json::Value);

/// A copy of `fixtures/<arch>/f32/config.json` with `edit` applied, in a temp folder.
fn edited_config(arch: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let text = std::fs::read_to_string(fixture(arch).join("f32/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut json);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    dir
}

#[test]
fn unsupported_config_fields_are_errors_naming_field_and_file() {
    let cases: [(&str, &str, Box<ConfigEdit>); 5] = [
        (
            "llama3",
            "rope_parameters.rope_type",
            Box::new(|j| j["rope_parameters"]["rope_type"] = "yarn".into()),
        ),
        (
            "qwen3",
            "use_sliding_window",
            Box::new(|j| j["use_sliding_window"] = true.into()),
        ),
        (
            "phi3",
            "sliding_window",
            Box::new(|j| j["sliding_window"] = 2047.into()),
        ),
        (
            "phi3",
            "partial_rotary_factor",
            Box::new(|j| j["rope_parameters"]["partial_rotary_factor"] = 0.5.into()),
        ),
        (
            "qwen3",
            "hidden_act",
            Box::new(|j| j["hidden_act"] = "gelu_pytorch_tanh".into()),
        ),
    ];
    for (arch, field, edit) in cases {
        let dir = edited_config(arch, edit);
        let err = format!("{:#}", hf::read_config(dir.path()).unwrap_err());
        let file = dir.path().join("config.json").display().to_string();
        assert!(
            err.contains(&format!("\"{field}\"")),
            "{arch} {field}: {err}"
        );
        assert!(
            err.contains(&file),
            "{arch} {field}: {err} does not name {file}"
        );
    }
}

/// Two AdamW steps of next-token loss on the reference batch, with LoRA on every projection
/// named the unfused way.
fn train_phi3_adapter() -> (Transformer, Tensor, Tensor) {
    let r = reference("phi3");
    let (ids, mask) = batch(&r);
    let mut model = load("phi3", "f32");
    // q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: as a manifest names them.
    let cfg = LoraConfig::all_linears(4, 8.0, true);
    assert_eq!(cfg.targets.len(), 7);
    model.add_lora(&cfg, 11).unwrap();
    let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default()).unwrap();
    for _ in 0..2 {
        let loss = next_token_loss(&model.forward_train(&ids, &mask).unwrap(), &ids);
        opt.step(&loss.backward().unwrap(), 1e-2).unwrap();
    }
    (model, ids, mask)
}

/// Tensor names and shapes of an adapter folder's weights, and its target_modules as a set.
fn adapter_layout(dir: &Path) -> (BTreeMap<String, Vec<usize>>, BTreeSet<String>) {
    let tensors =
        candle_core::safetensors::load(dir.join(adapter::ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    let shapes = tensors
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    let text = std::fs::read_to_string(dir.join(adapter::ADAPTER_CONFIG)).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    let targets = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    (shapes, targets)
}

#[test]
fn phi3_adapter_trained_by_emflow_saves_under_peft_names() {
    let (model, ids, mask) = train_phi3_adapter();
    let out = std::env::var_os("EMFLOW_PEFT_ROUNDTRIP_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = out.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let adapter_dir = dir.join("adapter");
    model.save_adapter(&adapter_dir).unwrap();
    assert_eq!(
        adapter_layout(&adapter_dir),
        adapter_layout(&fixture("phi3").join("adapter"))
    );
    // Read back onto a fresh model: the same logits.
    let logits = model.forward_eval(&ids, &mask).unwrap();
    let mut again = load("phi3", "f32");
    again.load_adapter(&adapter_dir).unwrap();
    assert!(max_abs_diff(&again.forward_eval(&ids, &mask).unwrap(), &logits) < 1e-6);
    if out.is_some() {
        let tensors = HashMap::from([
            ("input_ids".to_string(), ids.to_dtype(DType::I64).unwrap()),
            ("logits".to_string(), logits),
        ]);
        candle_core::safetensors::save(&tensors, dir.join("emflow_logits.safetensors")).unwrap();
    }
}

#[test]
fn lora_targets_map_onto_phi3_fused_projections() {
    let mut model = load("phi3", "f32");
    let only_k = LoraConfig {
        targets: vec!["k_proj".into(), "up_proj".into()],
        ..LoraConfig::all_linears(2, 4.0, false)
    };
    model.add_lora(&only_k, 0).unwrap();
    let names: Vec<String> = model.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 8, "{names:?}");
    assert!(names
        .iter()
        .all(|n| n.contains("qkv_proj") || n.contains("gate_up_proj")));
    let mut bad = load("phi3", "f32");
    let err = bad
        .add_lora(
            &LoraConfig {
                targets: vec!["w1".into()],
                ..only_k
            },
            0,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"w1\"") && err.contains("qkv_proj"), "{err}");
}
