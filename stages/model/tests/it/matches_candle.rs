//! Our HF-format path agrees with candle-transformers' `llama` and `qwen2` (random weights
//! written as safetensors, loaded by both), in the fused eval mode and the differentiable train
//! mode; padding (left or right) does not change a row's logits.

use crate::common::*;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2};
use emflow_model::{Arch, Transformer};
use serde_json::{json, Value};

const TOL: f32 = 1e-4;

fn sequence(len: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 37 + 11) % 250) as u32 + 3).collect()
}

/// Save a random tiny model, then load it back through our HF loader and candle's VarBuilder.
fn saved(arch: Arch) -> (tempfile::TempDir, Transformer, VarBuilder<'static>) {
    let dir = tempfile::tempdir().unwrap();
    tiny(arch, 5).save_full(dir.path()).unwrap();
    let w = emflow_model::weights::hf::read(dir.path(), &cpu()).unwrap();
    let ours = Transformer::from_tensors(w.config, w.tensors, &cpu()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    (dir, ours, vb)
}

/// A reference's config: the tiny model's shape (what [`saved`] writes), in the HF
/// `config.json` keys both candle models read, plus the architecture's own `extra` keys.
fn hf_config<T: serde::de::DeserializeOwned>(extra: Value) -> T {
    let mut config = json!({
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rope_theta": 10_000.0, "rms_norm_eps": 1e-5,
    });
    if let (Some(all), Value::Object(extra)) = (config.as_object_mut(), extra) {
        all.extend(extra);
    }
    serde_json::from_value(config).unwrap()
}

/// Our last-position logits for `seq` in eval and train modes.
fn ours_last(model: &Transformer, seq: &[u32]) -> (Tensor, Tensor) {
    let ids = ids(&[seq.to_vec()]);
    let mask = ones(1, seq.len());
    let last = seq.len() - 1;
    let eval = model
        .forward_eval(&ids, &mask)
        .unwrap()
        .i((0, last))
        .unwrap();
    let train = model
        .forward_train(&ids, &mask)
        .unwrap()
        .i((0, last))
        .unwrap();
    (eval, train)
}

/// Our last-position logits for `seq`, in eval and in train mode, are within [`TOL`] of the
/// reference's `want`.
fn assert_last_matches(arch: &str, ours: &Transformer, seq: &[u32], want: &Tensor) {
    let len = seq.len();
    let (eval, train) = ours_last(ours, seq);
    let (de, dt) = (max_abs_diff(&eval, want), max_abs_diff(&train, want));
    println!("{arch} len {len}: max |Δ| eval {de:.2e}, train {dt:.2e}");
    assert!(de < TOL && dt < TOL, "len {len}: eval {de}, train {dt}");
}

#[test]
fn llama_matches_candle_llama_in_both_modes() {
    let (_dir, ours, vb) = saved(Arch::Llama);
    let cfg = hf_config::<llama::LlamaConfig>(json!({
        "tie_word_embeddings": true,
        "rope_scaling": {
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_type": "llama3",
        },
    }))
    .into_config(false);
    let reference = llama::Llama::load(vb, &cfg).unwrap();
    for len in [1, 7, 90] {
        let seq = sequence(len);
        let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
        let want = reference
            .forward(&ids(std::slice::from_ref(&seq)), 0, &mut cache)
            .unwrap()
            .i(0)
            .unwrap();
        assert_last_matches("llama", &ours, &seq, &want);
    }
}

#[test]
fn qwen2_matches_candle_qwen2_in_both_modes() {
    let (_dir, ours, vb) = saved(Arch::Qwen2);
    let cfg: qwen2::Config = hf_config(json!({
        "tie_word_embeddings": false, "hidden_act": "silu",
        "use_sliding_window": false, "sliding_window": 512, "max_window_layers": 2,
    }));
    let mut reference = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
    for len in [1, 7, 90] {
        let seq = sequence(len);
        reference.clear_kv_cache();
        let want = reference
            .forward(&ids(std::slice::from_ref(&seq)), 0)
            .unwrap()
            .i((0, 0))
            .unwrap();
        assert_last_matches("qwen2", &ours, &seq, &want);
    }
}

#[test]
fn padding_on_either_side_leaves_real_positions_unchanged() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let model = tiny(arch, 9);
        let short = sequence(5);
        let long = sequence(12);
        let alone = model
            .forward_eval(&ids(std::slice::from_ref(&short)), &ones(1, 5))
            .unwrap()
            .i(0)
            .unwrap();
        // Left padding (generation layout) and right padding (training layout).
        let mut left = vec![0u32; 7];
        left.extend(&short);
        let mut right = short.clone();
        right.extend([0u32; 7]);
        let mask_left = Tensor::new(
            &[[0f32; 7].as_slice(), &[1f32; 5]].concat()[..],
            &Device::Cpu,
        )
        .unwrap();
        let mask_right = Tensor::new(
            &[[1f32; 5].as_slice(), &[0f32; 7]].concat()[..],
            &Device::Cpu,
        )
        .unwrap();
        let full = Tensor::ones(12, DType::F32, &Device::Cpu).unwrap();
        for train in [false, true] {
            let run = |rows: &[Vec<u32>], mask: &Tensor| {
                if train {
                    model.forward_train(&ids(rows), mask).unwrap()
                } else {
                    model.forward_eval(&ids(rows), mask).unwrap()
                }
            };
            let l = run(
                &[left.clone(), long.clone()],
                &Tensor::stack(&[&mask_left, &full], 0).unwrap(),
            );
            let r = run(
                &[right.clone(), long.clone()],
                &Tensor::stack(&[&mask_right, &full], 0).unwrap(),
            );
            let dl = max_abs_diff(&l.i((0, 7..12)).unwrap(), &alone);
            let dr = max_abs_diff(&r.i((0, 0..5)).unwrap(), &alone);
            assert!(
                dl < TOL && dr < TOL,
                "{arch:?} train={train}: left {dl}, right {dr}"
            );
            assert!(l
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite()));
        }
    }
}
