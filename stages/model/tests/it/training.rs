//! Gradients reach every trainable tensor (LoRA and full fine-tuning, both architectures), and
//! LoRA adapters survive save/load, merge and disabling with the logits they should give.

use crate::common::*;
use candle_core::{Device, Tensor};
use emflow_model::{Arch, LoraConfig, Transformer};

fn lora(r: usize, layers: Option<Vec<usize>>) -> LoraConfig {
    LoraConfig {
        layers,
        ..LoraConfig::all_linears(r, 16.0, true)
    }
}

fn batch() -> (Tensor, Tensor) {
    let rows = vec![
        (0..10).map(|i| (i * 13 + 5) % 256).collect::<Vec<u32>>(),
        (0..10).map(|i| (i * 29 + 7) % 256).collect::<Vec<u32>>(),
    ];
    // Second row right-padded by three.
    let mask = Tensor::new(
        &[[1f32; 10], [1., 1., 1., 1., 1., 1., 1., 0., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    (ids(&rows), mask)
}

/// Give every LoRA B a non-zero value: at initialisation B = 0, which (as in PEFT) makes A's
/// gradient exactly zero until the first update.
fn perturb_b(model: &Transformer) {
    for (name, var) in model.trainable_vars() {
        if name.contains("lora_B") {
            let noise = Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap();
            var.set(&noise).unwrap();
        }
    }
}

fn loss(model: &Transformer) -> Tensor {
    let (ids, mask) = batch();
    let logits = model.forward_train(&ids, &mask).unwrap();
    next_token_loss(&logits, &ids, &mask)
}

/// Mean next-token cross-entropy over real tokens (candle's gather needs contiguous inputs).
fn next_token_loss(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let t = ids.dim(1).unwrap();
    let shifted = |x: &Tensor, from: usize| x.narrow(1, from, t - 1).unwrap().contiguous().unwrap();
    let lp = emflow_model::token_logprobs(&shifted(logits, 0), &shifted(ids, 1), 1.0).unwrap();
    emflow_model::masked_mean(&lp.neg().unwrap(), &shifted(mask, 1)).unwrap()
}

fn assert_all_grads_nonzero(model: &Transformer, expected_vars: usize) {
    let vars = model.trainable_vars();
    assert_eq!(vars.len(), expected_vars);
    let grads = loss(model).backward().unwrap();
    assert_every_var_has_a_gradient(&vars, &grads);
}

#[test]
fn every_lora_tensor_gets_a_gradient() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let mut model = tiny(arch, 1);
        model.add_lora(&lora(4, None), 0).unwrap();
        perturb_b(&model);
        // 2 layers x 7 targets x (A, B).
        assert_all_grads_nonzero(&model, 28);
        let names: Vec<String> = model.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert!(names
            .contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_A.weight".to_string()));
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "trainable vars must come sorted by name");
    }
}

#[test]
fn every_weight_gets_a_gradient_with_full_finetuning() {
    // Llama tiny: tied embeddings, no biases: 1 + 2 x (2 norms + 7 linears) + final norm = 20.
    // Qwen2 tiny: + lm_head + 3 biases per layer = 27.
    for (arch, count) in [(Arch::Llama, 20), (Arch::Qwen2, 27)] {
        let mut model = tiny(arch, 2);
        model.enable_full_finetune().unwrap();
        assert_all_grads_nonzero(&model, count);
    }
}

#[test]
fn fresh_lora_leaves_logits_unchanged_and_layer_subsets_apply() {
    let mut model = tiny(Arch::Qwen2, 3);
    let (ids, mask) = batch();
    let before = model.forward_eval(&ids, &mask).unwrap();
    model.add_lora(&lora(2, Some(vec![1])), 7).unwrap();
    assert_eq!(model.trainable_vars().len(), 14);
    assert!(max_abs_diff(&before, &model.forward_eval(&ids, &mask).unwrap()) == 0.0);
}

#[test]
fn adapter_round_trip_merge_and_disable() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let (ids, mask) = batch();
        let mut model = tiny(arch, 4);
        let base = model.forward_eval(&ids, &mask).unwrap();
        model.add_lora(&lora(4, None), 1).unwrap();
        perturb_b(&model);
        let adapted = model.forward_eval(&ids, &mask).unwrap();
        assert!(
            max_abs_diff(&base, &adapted) > 1e-3,
            "the perturbed adapter must change logits"
        );

        let dir = tempfile::tempdir().unwrap();
        model.save_adapter(dir.path()).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 4);
        assert_eq!(cfg["use_rslora"], true);

        let mut reloaded = tiny(arch, 4);
        reloaded.load_adapter(dir.path()).unwrap();
        assert_eq!(
            max_abs_diff(&adapted, &reloaded.forward_eval(&ids, &mask).unwrap()),
            0.0
        );

        reloaded.set_lora_enabled(false);
        assert_eq!(
            max_abs_diff(&base, &reloaded.forward_eval(&ids, &mask).unwrap()),
            0.0
        );
        reloaded.set_lora_enabled(true);

        reloaded.merge_lora().unwrap();
        assert!(reloaded.trainable_vars().is_empty());
        let merged = reloaded.forward_eval(&ids, &mask).unwrap();
        let d = max_abs_diff(&adapted, &merged);
        assert!(d < 1e-4, "{arch:?}: merged logits differ by {d}");
    }
}

/// Ten tokens in all: eval passes this small take the decode path (packed weights, the adapter
/// applied on the host), which must agree with the merged weights and with the wide path.
#[test]
fn a_decode_sized_pass_applies_the_adapter_like_the_merged_weights() {
    let (ids, mask) = batch();
    let (ids, mask) = (ids.narrow(1, 0, 5).unwrap(), mask.narrow(1, 0, 5).unwrap());
    let mut model = tiny(Arch::Qwen2, 4);
    model.add_lora(&lora(4, None), 1).unwrap();
    perturb_b(&model);
    let adapted = model.forward_eval(&ids, &mask).unwrap();
    let (wide_ids, wide_mask) = batch();
    let wide = model
        .forward_eval(&wide_ids, &wide_mask)
        .unwrap()
        .narrow(1, 0, 5)
        .unwrap();
    let d = max_abs_diff(&adapted, &wide);
    assert!(d < 1e-4, "decode-sized and wide passes differ by {d}");
    model.merge_lora().unwrap();
    let d = max_abs_diff(&adapted, &model.forward_eval(&ids, &mask).unwrap());
    assert!(d < 1e-4, "merged logits differ by {d}");
}

#[test]
fn full_weights_round_trip() {
    let (ids, mask) = batch();
    let mut model = tiny(Arch::Llama, 6);
    model.enable_full_finetune().unwrap();
    for (_, v) in model.trainable_vars().iter().take(3) {
        let bumped = (v.as_tensor() + 0.01).unwrap();
        v.set(&bumped).unwrap();
    }
    let want = model.forward_eval(&ids, &mask).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_full(dir.path()).unwrap();
    let mut other = tiny(Arch::Llama, 99);
    other.load_full(dir.path()).unwrap();
    assert_eq!(
        max_abs_diff(&want, &other.forward_eval(&ids, &mask).unwrap()),
        0.0
    );
}

#[test]
fn logits_of_a_position_range_equal_that_slice_of_the_full_logits_and_carry_gradients() {
    let mut model = tiny(Arch::Qwen2, 4);
    model.enable_full_finetune().unwrap();
    let (ids, mask) = batch();
    let full = model.forward_train(&ids, &mask).unwrap();
    let (tail, _) = model
        .forward_train_hidden_range(&ids, &mask, &[], 5, 4)
        .unwrap();
    assert_eq!(tail.dims(), &[2, 4, full.dim(2).unwrap()]);
    assert!(max_abs_diff(&tail, &full.narrow(1, 5, 4).unwrap()) < 1e-6);
    let grads = tail.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in model.trainable_vars() {
        assert!(grads.get(&var).is_some(), "{name} got no gradient");
    }
    assert!(model
        .forward_train_hidden_range(&ids, &mask, &[], 7, 4)
        .is_err());
}

#[test]
fn position_scores_match_the_logits_path_in_values_entropy_and_gradients() {
    // LoRA: the output projection is frozen, so the CPU pass never builds logits; the
    // reference is the logits of the same positions through token_logprobs.
    let mut model = tiny(Arch::Llama, 2);
    model.add_lora(&lora(4, None), 3).unwrap();
    perturb_b(&model);
    let (ids, mask) = batch();
    let (from, len, temperature) = (3, 6, 0.7);
    let targets = ids.narrow(1, from + 1, len).unwrap().contiguous().unwrap();
    let weights = Tensor::randn(0f32, 1.0, (2, len), &Device::Cpu).unwrap();

    let scores = model
        .forward_train_scores(&ids, &mask, &[], (from, len), &targets, temperature)
        .unwrap();
    let (logits, _) = model
        .forward_train_hidden_range(&ids, &mask, &[], from, len)
        .unwrap();
    let want = emflow_model::token_logprobs(&logits, &targets, temperature).unwrap();
    assert_eq!(scores.logprobs.dims(), &[2, len]);
    assert!(max_abs_diff(&scores.logprobs, &want) < 1e-5);

    let z = (logits.detach() / temperature).unwrap();
    let logp = candle_nn::ops::log_softmax(&z, candle_core::D::Minus1).unwrap();
    let entropy = (logp.exp().unwrap() * &logp)
        .unwrap()
        .sum(candle_core::D::Minus1)
        .unwrap()
        .neg()
        .unwrap();
    assert!(max_abs_diff(&scores.entropy, &entropy) < 1e-4);

    let ours = (scores.logprobs * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let plain = (want * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in model.trainable_vars() {
        let (a, b) = (
            ours.get(&var).expect("a gradient"),
            plain.get(&var).expect("a gradient"),
        );
        let scale = max_abs_diff(b, &b.zeros_like().unwrap());
        assert!(scale > 0.0, "{name} has a zero gradient");
        assert!(
            max_abs_diff(a, b) <= 1e-4 * scale.max(1.0),
            "{name}: gradients differ"
        );
    }
    assert!(model
        .forward_train_scores(&ids, &mask, &[], (7, 4), &targets, 1.0)
        .is_err());
}
