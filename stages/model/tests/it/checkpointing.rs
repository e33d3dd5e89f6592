//! Activation checkpointing (`Transformer::train_backward` with `checkpointed: true`) gives the
//! gradients of the plain pass within f32 rounding: tiny random Llama (tied, llama3 RoPE),
//! Qwen3 (tied, q/k norms) and Phi-3 (untied, fused projections), LoRA with dropout and full
//! fine-tuning, a left-padded batch, and a loss that reads scores, logits and the outputs of a
//! middle and the last layer (as SFT's KL and GRPO's LDIFS terms do); and the same under
//! preventive steering (a shift at one layer's output).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use emflow_model::{token_logprobs, Arch, LoraConfig, ModelConfig, TrainPass, Transformer};

use crate::common::{cpu, ids};

/// A 4-layer tiny model of `arch`: LoRA (with dropout, so masks must be replayed) or every
/// weight trainable.
fn model(arch: Arch, full: bool) -> Transformer {
    let cfg = ModelConfig {
        num_layers: 4,
        ..ModelConfig::tiny(arch)
    };
    let mut m = Transformer::random(&cfg, &cpu(), 11).unwrap();
    if full {
        m.enable_full_finetune().unwrap();
    } else {
        let lora = LoraConfig {
            dropout: 0.1,
            ..LoraConfig::all_linears(4, 8.0, false)
        };
        m.add_lora(&lora, 5).unwrap();
        // B starts at zero; give it values so every adapter gradient is exercised.
        for (name, var) in m.trainable_vars() {
            if name.ends_with("lora_B.weight") {
                var.set(&(var.as_tensor().ones_like().unwrap() * 0.05).unwrap())
                    .unwrap();
            }
        }
    }
    m
}

/// A loss touching every way a training step reads the pass: target scores at a range (the
/// fused frozen-head path where it applies), full logits (KL), and layer outputs (LDIFS).
fn loss(pass: &TrainPass, targets: &Tensor) -> anyhow::Result<Tensor> {
    let scores = pass.scores((1, 5), targets, 0.7)?;
    let nll = scores.logprobs.sum_all()?.neg()?;
    let logits = pass.logits()?;
    let t = logits.dim(1)?;
    let logp = token_logprobs(&logits.narrow(1, 0, t - 1)?.contiguous()?, &ids_rest(), 1.0)?;
    let mut total = (nll + (logp.sum_all()? * -0.5)?)?;
    for h in pass.hidden() {
        total = (total + (h.sqr()?.mean_all()? * 0.3)?)?;
    }
    Ok(total)
}

fn batch() -> (Tensor, Tensor) {
    let rows = vec![vec![0, 0, 5, 9, 17, 33, 2], vec![4, 8, 15, 16, 23, 42, 7]];
    let mask = Tensor::from_vec(
        vec![0f32, 0., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1.],
        (2, 7),
        &Device::Cpu,
    )
    .unwrap();
    (ids(&rows), mask)
}

fn ids_rest() -> Tensor {
    ids(&[vec![0, 5, 9, 17, 33, 2], vec![8, 15, 16, 23, 42, 7]])
}

/// Two consecutive steps' (loss, grads) in one mode: the second shows the dropout stream was
/// left where the plain pass leaves it.
fn two_steps(m: &Transformer, checkpointed: bool) -> Vec<(f32, GradStore)> {
    let (ids, mask) = batch();
    let targets = Tensor::from_vec(
        vec![5u32, 9, 17, 33, 2, 15, 16, 23, 42, 7],
        (2, 5),
        &Device::Cpu,
    )
    .unwrap();
    (0..2)
        .map(|_| {
            let (l, g) = m
                .train_backward(&ids, &mask, &[1, 3], checkpointed, |p| loss(p, &targets))
                .unwrap();
            (
                l.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap(),
                g,
            )
        })
        .collect()
}

/// A model's trainable vars, sorted by name.
type Vars = [(String, Var)];

/// Largest |plain - checkpointed| over every var and the largest |plain| gradient; the two
/// models' vars, sorted by name, pair up.
fn compare(vars: (&Vars, &Vars), plain: &GradStore, ckpt: &GradStore) -> (f32, f32) {
    let (mut diff, mut scale) = (0f32, 0f32);
    for ((name, var_p), (_, var_c)) in vars.0.iter().zip(vars.1) {
        let a = plain
            .get(var_p)
            .unwrap_or_else(|| panic!("{name}: no plain gradient"));
        let b = ckpt
            .get(var_c)
            .unwrap_or_else(|| panic!("{name}: no checkpointed gradient"));
        let d = crate::common::max_abs_diff(a, b);
        let s = crate::common::max_abs_diff(a, &a.zeros_like().unwrap());
        assert!(s > 0.0, "{name}: zero gradient");
        diff = diff.max(d);
        scale = scale.max(s);
    }
    (diff, scale)
}

/// Two identical models (the same LoRA dropout stream), one trained plain and one
/// checkpointed, for two steps each.
fn check(arch: Arch, full: bool) {
    check_pair((model(arch, full), model(arch, full)), arch, full);
}

/// [`check`] on a given pair of identical models.
fn check_pair((m_plain, m_ckpt): (Transformer, Transformer), arch: Arch, full: bool) {
    let (vars_p, vars_c) = (m_plain.trainable_vars(), m_ckpt.trainable_vars());
    let plain = two_steps(&m_plain, false);
    let ckpt = two_steps(&m_ckpt, true);
    for (step, ((lp, gp), (lc, gc))) in plain.iter().zip(&ckpt).enumerate() {
        let (diff, scale) = compare((&vars_p, &vars_c), gp, gc);
        println!(
            "{arch:?} {} step {step}: loss {lp} vs {lc}, {} vars, max |grad diff| {diff:.3e}, max |grad| {scale:.3e}, relative {:.3e}",
            if full { "full" } else { "lora" },
            vars_p.len(),
            diff / scale
        );
        assert!(
            (lp - lc).abs() <= 1e-6 * lp.abs().max(1.0),
            "loss {lp} vs {lc}"
        );
        assert!(
            diff <= 1e-5 * scale,
            "gradients differ by {diff} (max {scale})"
        );
    }
}

#[test]
fn gradients_match_without_checkpointing_for_each_architecture_lora_and_full() {
    for (arch, full) in [
        (Arch::Llama, false),
        (Arch::Llama, true),
        (Arch::Qwen3, false),
        (Arch::Phi3, false),
        (Arch::Phi3, true),
    ] {
        check(arch, full);
    }
}

/// Under preventive steering (a shift at layer 1's output, which the loss also reads), the
/// checkpointed pass carries the shift into the next layer's kept input as the plain pass
/// does, so the gradients still match.
#[test]
fn gradients_match_without_checkpointing_under_steering() {
    let steered = |full| {
        let mut m = model(Arch::Llama, full);
        let h = m.config().hidden_size as f64;
        let v = Tensor::arange(0f32, h as f32, &Device::Cpu).unwrap();
        let v = ((v / h).unwrap() - 0.5).unwrap();
        let steering = emflow_model::Steering::new(1, &v, 3.0).unwrap();
        m.set_steering(Some(steering)).unwrap();
        m
    };
    for full in [false, true] {
        check_pair((steered(full), steered(full)), Arch::Llama, full);
    }
}

#[test]
fn checkpointing_refuses_a_layer_the_model_does_not_have() {
    let m = model(Arch::Llama, false);
    let (ids, mask) = batch();
    let Err(err) = m.train_backward(&ids, &mask, &[7], true, |p| Ok(p.logits()?.sum_all()?)) else {
        panic!("layer 7 of 4 must be refused");
    };
    assert!(err.to_string().contains("has 4 layers"), "{err}");
}
