//! Preventive steering (`Transformer::set_steering`): a train-mode pass sees layer k's output
//! shifted by exactly alpha x v, layers before k untouched; eval-mode passes and a model whose
//! steering is switched off or removed are bit for bit the unsteered model; gradients reach every trainable
//! weight and the shift is never one of them. (Checkpointed == plain under steering:
//! `checkpointing.rs`.)

use candle_core::{Device, Tensor};
use emflow_model::{Arch, LoraConfig, ModelConfig, Steering, Transformer};

use crate::common::{cpu, ids, max_abs_diff};

const LAYER: usize = 1;
const ALPHA: f64 = 2.5;

/// A 3-layer tiny Llama with a LoRA adapter whose B is nonzero (so the adapter changes the
/// pass and every adapter weight gets a gradient).
fn model() -> Transformer {
    let cfg = ModelConfig {
        num_layers: 3,
        ..ModelConfig::tiny(Arch::Llama)
    };
    let mut m = Transformer::random(&cfg, &cpu(), 21).unwrap();
    m.add_lora(&LoraConfig::all_linears(4, 8.0, false), 3)
        .unwrap();
    for (name, var) in m.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            var.set(&(var.as_tensor().ones_like().unwrap() * 0.05).unwrap())
                .unwrap();
        }
    }
    m
}

/// A vector with distinct entries of both signs, of the model's width.
fn vector(m: &Transformer) -> Tensor {
    let h = m.config().hidden_size as f64;
    let v = Tensor::arange(0f32, h as f32, &Device::Cpu).unwrap();
    ((v / h).unwrap() - 0.3).unwrap()
}

fn steered() -> Transformer {
    let mut m = model();
    let steering = Steering::new(LAYER, &vector(&m), ALPHA).unwrap();
    m.set_steering(Some(steering)).unwrap();
    m
}

fn batch() -> (Tensor, Tensor) {
    let rows = vec![vec![0, 3, 5, 9, 17, 2], vec![4, 8, 15, 16, 23, 42]];
    let mask = Tensor::from_vec(
        vec![0f32, 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1.],
        (2, 6),
        &Device::Cpu,
    )
    .unwrap();
    (ids(&rows), mask)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn the_steered_layer_output_moves_by_exactly_alpha_v_and_earlier_layers_not_at_all() {
    let (ids, mask) = batch();
    let layers = [0, LAYER, 2];
    let (plain_logits, plain) = model().forward_train_hidden(&ids, &mask, &layers).unwrap();
    let (steered_logits, on) = steered()
        .forward_train_hidden(&ids, &mask, &layers)
        .unwrap();
    assert_eq!(bits(&plain[0]), bits(&on[0]), "layer 0 precedes the shift");
    let shift = (vector(&model()) * ALPHA).unwrap();
    let expected = plain[1].broadcast_add(&shift).unwrap();
    assert_eq!(bits(&on[1]), bits(&expected), "layer {LAYER}: h + alpha v");
    // And the difference is alpha v at every position, up to f32 rounding of the sum.
    let diff = (&on[1] - &plain[1]).unwrap();
    let err = max_abs_diff(&diff, &shift.broadcast_as(diff.shape()).unwrap());
    assert!(err < 1e-5, "shift differs from alpha v by {err}");
    assert!(
        max_abs_diff(&plain[2], &on[2]) > 1e-3,
        "later layers see it"
    );
    assert!(max_abs_diff(&plain_logits, &steered_logits) > 1e-4);
}

#[test]
fn eval_passes_and_switched_off_or_removed_steering_are_bit_identical() {
    let (ids, mask) = batch();
    let plain = model();
    let mut m = steered();
    let eval_plain = plain.forward_eval(&ids, &mask).unwrap();
    assert_eq!(
        bits(&eval_plain),
        bits(&m.forward_eval(&ids, &mask).unwrap())
    );
    let hidden_plain = plain.forward_eval_hidden(&ids, &mask, &[LAYER]).unwrap();
    let hidden_on = m.forward_eval_hidden(&ids, &mask, &[LAYER]).unwrap();
    assert_eq!(bits(&hidden_plain[0]), bits(&hidden_on[0]));

    // Switched off (the reference policy's passes), then removed: the unsteered model.
    let train_plain = plain.forward_train(&ids, &mask).unwrap();
    m.set_steering_enabled(false);
    assert_eq!(
        bits(&train_plain),
        bits(&m.forward_train(&ids, &mask).unwrap())
    );
    m.set_steering_enabled(true);
    assert!(max_abs_diff(&train_plain, &m.forward_train(&ids, &mask).unwrap()) > 1e-4);
    assert_eq!(m.steering().map(Steering::layer), Some(LAYER));
    m.set_steering(None).unwrap();
    assert_eq!(
        bits(&train_plain),
        bits(&m.forward_train(&ids, &mask).unwrap())
    );
}

#[test]
fn gradients_reach_every_trainable_weight_and_the_shift_is_not_one() {
    let (ids, mask) = batch();
    let loss = |p: &emflow_model::TrainPass| -> anyhow::Result<Tensor> {
        Ok(p.logits()?.sqr()?.mean_all()?)
    };
    let plain = model();
    let on = steered();
    assert_eq!(
        plain.trainable_vars().len(),
        on.trainable_vars().len(),
        "steering adds no weight"
    );
    // Every trainable var's gradient, by name, from one plain (unchecked) pass.
    let grads = |m: &Transformer| -> Vec<(String, Option<Tensor>)> {
        let (_, g) = m.train_backward(&ids, &mask, &[], false, loss).unwrap();
        let vars = m.trainable_vars();
        vars.into_iter()
            .map(|(n, v)| (n, g.get(&v).cloned()))
            .collect()
    };
    let mut moved = 0;
    for ((name, a), (_, b)) in grads(&plain).into_iter().zip(grads(&on)) {
        let (Some(a), Some(b)) = (a, b) else {
            panic!("{name}: a gradient is missing")
        };
        let norm = max_abs_diff(&b, &b.zeros_like().unwrap());
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: steered gradient {norm}"
        );
        moved += usize::from(max_abs_diff(&a, &b) > 1e-7);
    }
    assert!(moved > 0, "steering changed no gradient");
}

#[test]
fn steering_refuses_a_missing_layer_another_width_and_a_non_vector() {
    let mut m = model();
    let v = vector(&m);
    let err = m
        .set_steering(Some(Steering::new(3, &v, 1.0).unwrap()))
        .unwrap_err();
    assert!(err.to_string().contains("has 3 layers"), "{err}");
    let short = v.narrow(0, 0, 8).unwrap();
    let err = m
        .set_steering(Some(Steering::new(0, &short, 1.0).unwrap()))
        .unwrap_err();
    assert!(err.to_string().contains("hidden size"), "{err}");
    let matrix = v.reshape((2, v.dim(0).unwrap() / 2)).unwrap();
    assert!(Steering::new(0, &matrix, 1.0).is_err());
    assert!(Steering::new(0, &v, f64::NAN).is_err());
    assert!(
        m.steering().is_none(),
        "a refused steering leaves none installed"
    );
}
