//! Token log-probabilities and masked losses against direct computations.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use emflow_model::{masked_mean, masked_mean_per_row, masked_sum, sft_loss, token_logprobs};

/// log softmax(row / temperature)[target], in f64.
fn manual_logprob(row: &[f32], target: usize, temperature: f64) -> f64 {
    let z: Vec<f64> = row.iter().map(|&x| x as f64 / temperature).collect();
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    z[target] - lse
}

fn logits_data() -> Vec<f32> {
    // (2, 3, 5), with one large value to exercise the max shift.
    (0..30)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.9 + if i == 4 { 80.0 } else { 0.0 })
        .collect()
}

/// `data` as (2, 3, 5) logits.
fn logits_tensor(data: &[f32]) -> Tensor {
    Tensor::from_vec(data.to_vec(), (2, 3, 5), &Device::Cpu).unwrap()
}

/// `data` as (2, 3, 5) logits to differentiate.
fn logits_var(data: &[f32]) -> Var {
    Var::from_tensor(&logits_tensor(data)).unwrap()
}

/// The logits of `data` at row `b`, position `t`.
fn row(data: &[f32], b: usize, t: usize) -> &[f32] {
    &data[(b * 3 + t) * 5..(b * 3 + t + 1) * 5]
}

/// (2, 3) token ids.
fn ids(rows: [[u32; 3]; 2]) -> Tensor {
    Tensor::new(&rows, &Device::Cpu).unwrap()
}

/// The gradient `grads` holds for `logits`, flattened.
fn logits_gradient(grads: &GradStore, logits: &Var) -> Vec<f32> {
    let g = grads
        .get(logits.as_tensor())
        .expect("gradient reaches the logits");
    g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `g`, the gradient of `sum(weights * token_logprobs)` for the (2, 3, 5) logits `data` and
/// the flattened `targets`, is `weight * (onehot(target) - p) / temperature` at each position,
/// p the softmax at `temperature`.
fn assert_logprob_gradient(
    g: &[f32],
    data: &[f32],
    targets: [usize; 6],
    weights: [f32; 6],
    temperature: f64,
) {
    for (pos, &target) in targets.iter().enumerate() {
        let row = &data[pos * 5..pos * 5 + 5];
        for k in 0..5 {
            let p = manual_logprob(row, k, temperature).exp();
            let onehot = if k == target { 1.0 } else { 0.0 };
            let want = weights[pos] as f64 * (onehot - p) / temperature;
            assert!(
                (g[pos * 5 + k] as f64 - want).abs() < 1e-5,
                "pos {pos}, k {k}: {} vs {want}",
                g[pos * 5 + k]
            );
        }
    }
}

#[test]
fn token_logprobs_match_log_softmax_at_each_temperature() {
    let data = logits_data();
    let logits = logits_tensor(&data);
    let target_ids = [[4u32, 0, 2], [1, 3, 3]];
    let targets = ids(target_ids);
    for temperature in [1.0, 0.7, 2.0] {
        let got = token_logprobs(&logits, &targets, temperature)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for b in 0..2 {
            for t in 0..3 {
                let target = target_ids[b][t] as usize;
                let want = manual_logprob(row(&data, b, t), target, temperature);
                assert!(
                    (got[b][t] as f64 - want).abs() < 1e-5,
                    "T={temperature} ({b},{t}): {} vs {want}",
                    got[b][t]
                );
            }
        }
    }
    // A narrowed (non-contiguous) view of the logits works too.
    let view = token_logprobs(
        &logits.narrow(1, 1, 2).unwrap(),
        &targets.narrow(1, 1, 2).unwrap(),
        1.0,
    )
    .unwrap();
    let full = token_logprobs(&logits, &targets, 1.0)
        .unwrap()
        .narrow(1, 1, 2)
        .unwrap();
    assert_eq!(
        view.to_vec2::<f32>().unwrap(),
        full.to_vec2::<f32>().unwrap()
    );
    assert!(token_logprobs(&logits, &targets, 0.0).is_err());
    assert!(token_logprobs(&logits, &targets.narrow(1, 0, 2).unwrap(), 1.0).is_err());
}

#[test]
fn token_logprobs_gradient_is_onehot_minus_softmax() {
    let data = logits_data();
    let logits = logits_var(&data);
    let targets = ids([[4, 0, 2], [1, 3, 3]]);
    let lp = token_logprobs(logits.as_tensor(), &targets, 1.0).unwrap();
    let grads = lp.sum_all().unwrap().backward().unwrap();
    let g = logits_gradient(&grads, &logits);
    let weights = [1.0; 6];
    assert_logprob_gradient(&g, &data, [4, 0, 2, 1, 3, 3], weights, 1.0);
}

#[test]
fn token_logprobs_gradient_scales_with_temperature_and_upstream_gradient() {
    let data = logits_data();
    let logits = logits_var(&data);
    let targets = ids([[1, 1, 4], [0, 2, 3]]);
    let weights = [0.5f32, -2.0, 1.0, 3.0, 0.0, -0.25];
    let w = Tensor::from_vec(weights.to_vec(), (2, 3), &Device::Cpu).unwrap();
    let temperature = 0.7;
    let lp = token_logprobs(logits.as_tensor(), &targets, temperature).unwrap();
    let grads = (lp * w).unwrap().sum_all().unwrap().backward().unwrap();
    let g = logits_gradient(&grads, &logits);
    assert_logprob_gradient(&g, &data, [1, 1, 4, 0, 2, 3], weights, temperature);
}

#[test]
fn masked_reductions() {
    let v = Tensor::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
    let m = Tensor::new(&[[1u8, 1, 0], [0, 0, 1]], &Device::Cpu).unwrap();
    assert_eq!(masked_sum(&v, &m).unwrap().to_scalar::<f32>().unwrap(), 9.0);
    assert_eq!(
        masked_mean(&v, &m).unwrap().to_scalar::<f32>().unwrap(),
        3.0
    );
    // Rows: mean(1,2) = 1.5 and 6, averaged = 3.75.
    assert_eq!(
        masked_mean_per_row(&v, &m)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        3.75
    );
    let empty = Tensor::zeros((2, 3), candle_core::DType::U8, &Device::Cpu).unwrap();
    assert_eq!(
        masked_mean(&v, &empty).unwrap().to_scalar::<f32>().unwrap(),
        0.0
    );
    assert!(masked_sum(&v, &m.narrow(1, 0, 2).unwrap()).is_err());
}

#[test]
fn sft_loss_is_the_mean_cross_entropy_of_masked_next_tokens() {
    let data = logits_data();
    let logits = logits_tensor(&data);
    let ids = ids([[0, 4, 1], [2, 2, 3]]);
    // Position 0 is never a target; row 0 learns token 2 (id 1), row 1 tokens 1 and 2.
    let mask = Tensor::new(&[[1u8, 0, 1], [0, 1, 1]], &Device::Cpu).unwrap();
    let got = sft_loss(&logits, &ids, &mask)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let want = -(manual_logprob(row(&data, 0, 1), 1, 1.0)
        + manual_logprob(row(&data, 1, 0), 2, 1.0)
        + manual_logprob(row(&data, 1, 1), 3, 1.0))
        / 3.0;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    assert!(sft_loss(
        &logits.narrow(1, 0, 1).unwrap(),
        &ids.narrow(1, 0, 1).unwrap(),
        &mask.narrow(1, 0, 1).unwrap()
    )
    .is_err());
}
