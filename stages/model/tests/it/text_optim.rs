//! AdamW against torch's update rule, bit-exact resume, clipping, accumulation, schedules.

use candle_core::{DType, Device, Tensor, Var};
use emflow_model::optim::transformers_decays;
use emflow_model::{accumulate, clip_grad_norm, AdamW, AdamWConfig, LrSchedule, Schedule};

/// torch.optim.AdamW for one scalar parameter, in f64.
struct ScalarAdamW {
    p: f64,
    m: f64,
    v: f64,
    t: i32,
}

impl ScalarAdamW {
    fn step(&mut self, g: f64, lr: f64, c: &AdamWConfig) {
        self.t += 1;
        self.p *= 1.0 - lr * c.weight_decay;
        self.m = c.beta1 * self.m + (1.0 - c.beta1) * g;
        self.v = c.beta2 * self.v + (1.0 - c.beta2) * g * g;
        let bc1 = 1.0 - c.beta1.powi(self.t);
        let bc2 = 1.0 - c.beta2.powi(self.t);
        self.p -= lr / bc1 * self.m / (self.v.sqrt() / bc2.sqrt() + c.eps);
    }
}

/// Gradients of `sum(var * coeffs)`, i.e. exactly `coeffs`.
fn grads_equal_to(var: &Var, coeffs: &[f32]) -> candle_core::backprop::GradStore {
    let c = Tensor::new(coeffs, &Device::Cpu).unwrap();
    var.as_tensor()
        .mul(&c)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

#[test]
fn adamw_steps_follow_torch() {
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let init = [1.0f32, -2.0, 0.5];
    let var = Var::new(&init, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg.clone()).unwrap();
    let mut reference: Vec<ScalarAdamW> = init
        .iter()
        .map(|&p| ScalarAdamW {
            p: p as f64,
            m: 0.0,
            v: 0.0,
            t: 0,
        })
        .collect();
    let grads = [[0.5f32, -1.0, 0.0], [0.25, 2.0, -3.0], [-1.0, 0.5, 1e-3]];
    for (i, g) in grads.iter().enumerate() {
        let lr = 0.1 / (i + 1) as f64;
        opt.step(&grads_equal_to(&var, g), lr).unwrap();
        for (r, &gi) in reference.iter_mut().zip(g) {
            r.step(gi as f64, lr, &cfg);
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for (j, (got, r)) in got.iter().zip(&reference).enumerate() {
            assert!(
                (*got as f64 - r.p).abs() < 1e-6,
                "step {i}, element {j}: {got} vs {}",
                r.p
            );
        }
    }
    // The first step by hand: decay, then lr * g/|g| (bias-corrected moments are g and g^2).
    let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
    opt.step(&grads_equal_to(&var, &[0.5]), 0.1).unwrap();
    let expected = 1.0 * (1.0 - 0.1 * 0.1) - 0.1 * 0.5 / (0.5 + 1e-8);
    assert!((var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64 - expected).abs() < 1e-7);
    assert_eq!(opt.step_count(), 1);
}

#[test]
fn vars_without_gradient_and_without_decay_are_left_alone() {
    let a = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let norm = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        vec![
            ("a".into(), a.clone()),
            ("model.norm.weight".into(), norm.clone()),
        ],
        AdamWConfig::with_weight_decay(0.5),
    )
    .unwrap();
    opt.set_weight_decay_filter(transformers_decays);
    // Only `norm` gets a (zero) gradient: `a` keeps its value, `norm` is not decayed.
    opt.step(&grads_equal_to(&norm, &[0.0]), 0.1).unwrap();
    assert_eq!(a.as_tensor().to_vec1::<f32>().unwrap(), [1.0]);
    assert_eq!(norm.as_tensor().to_vec1::<f32>().unwrap(), [1.0]);
    assert!(AdamW::new(
        vec![("x".into(), a.clone()), ("x".into(), a)],
        AdamWConfig::default()
    )
    .is_err());
}

/// A small regression problem: two vars, mean squared error, clipping and a cosine schedule.
struct Problem {
    vars: Vec<(String, Var)>,
    x: Tensor,
    y: Tensor,
}

impl Problem {
    fn new(weights: Option<(Vec<f32>, Vec<f32>)>) -> Self {
        let dev = Device::Cpu;
        let (w, b) = weights.unwrap_or_else(|| {
            (
                (0..12).map(|i| (i as f32 * 0.37).sin()).collect(),
                vec![0.1, -0.2, 0.3],
            )
        });
        let w = Var::from_tensor(&Tensor::from_vec(w, (4, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::from_vec(b, 3, &dev).unwrap()).unwrap();
        let x = Tensor::from_vec(
            (0..32).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(),
            (8, 4),
            &dev,
        )
        .unwrap();
        let y = Tensor::from_vec(
            (0..24)
                .map(|i| (i as f32 * 0.23).sin() * 3.0)
                .collect::<Vec<_>>(),
            (8, 3),
            &dev,
        )
        .unwrap();
        Self {
            vars: vec![("b".into(), b), ("w".into(), w)],
            x,
            y,
        }
    }

    fn weights(&self) -> (Vec<f32>, Vec<f32>) {
        let b = self.vars[0].1.as_tensor().to_vec1::<f32>().unwrap();
        let w = self.vars[1]
            .1
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (w, b)
    }

    fn train(&self, opt: &mut AdamW, schedule: &LrSchedule, steps: std::ops::Range<usize>) {
        for step in steps {
            let pred = self
                .x
                .matmul(self.vars[1].1.as_tensor())
                .unwrap()
                .broadcast_add(self.vars[0].1.as_tensor())
                .unwrap();
            let loss = (pred - &self.y).unwrap().sqr().unwrap().mean_all().unwrap();
            let mut grads = loss.backward().unwrap();
            clip_grad_norm(&self.vars, &mut grads, 1.0).unwrap();
            opt.step(&grads, schedule.lr_at(step)).unwrap();
        }
    }
}

#[test]
fn resuming_from_saved_state_is_bit_exact() {
    let cfg = AdamWConfig::with_weight_decay(0.01);
    let schedule = LrSchedule {
        base_lr: 0.05,
        kind: Schedule::Cosine,
        warmup_steps: 3,
        total_steps: 20,
    };

    let straight = Problem::new(None);
    let mut opt = AdamW::new(straight.vars.clone(), cfg.clone()).unwrap();
    straight.train(&mut opt, &schedule, 0..20);

    let first = Problem::new(None);
    let mut opt = AdamW::new(first.vars.clone(), cfg.clone()).unwrap();
    first.train(&mut opt, &schedule, 0..9);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("optimizer.safetensors");
    opt.save(&state).unwrap();
    let saved_weights = first.weights();
    drop((first, opt));

    let resumed = Problem::new(Some(saved_weights));
    let mut opt = AdamW::new(resumed.vars.clone(), cfg).unwrap();
    opt.load(&state).unwrap();
    assert_eq!(opt.step_count(), 9);
    resumed.train(&mut opt, &schedule, 9..20);

    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let (w1, b1) = straight.weights();
    let (w2, b2) = resumed.weights();
    assert_eq!(bits(w1), bits(w2));
    assert_eq!(bits(b1), bits(b2));
    // And the run did learn something (so the comparison is not between untouched weights).
    assert_ne!(straight.weights(), Problem::new(None).weights());
}

#[test]
fn loading_state_saved_for_other_vars_fails_clearly() {
    let p = Problem::new(None);
    let opt = AdamW::new(p.vars.clone(), AdamWConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("opt.safetensors");
    opt.save(&state).unwrap();
    let other = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let mut wrong = AdamW::new(vec![("other".into(), other)], AdamWConfig::default()).unwrap();
    let err = format!("{:#}", wrong.load(&state).unwrap_err());
    assert!(err.contains("holds 2 vars"), "{err}");
}

#[test]
fn clipping_scales_to_the_max_norm_and_reports_the_norm_before() {
    let a = Var::new(&[3.0f32], &Device::Cpu).unwrap();
    let b = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let loss = (a
        .as_tensor()
        .mul(&Tensor::new(&[3.0f32], &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        + b.as_tensor()
            .mul(&Tensor::new(&[4.0f32], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let mut grads = loss.backward().unwrap();
    let norm = clip_grad_norm(&vars, &mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
    let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
    assert!(
        (ga - 0.6).abs() < 1e-6 && (gb - 0.8).abs() < 1e-6,
        "{ga} {gb}"
    );
    // Under the limit: untouched.
    let norm = clip_grad_norm(&vars, &mut grads, 10.0).unwrap();
    assert!((norm - 1.0).abs() < 1e-5);
    assert!((grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0] - 0.6).abs() < 1e-6);
}

#[test]
fn accumulation_sums_scaled_var_gradients_only() {
    let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let vars = vec![("w".to_string(), w.clone())];
    let mut acc = None;
    let mut constants = Vec::new();
    for coeffs in [[1.0f32, 2.0], [3.0, 6.0]] {
        let c = Tensor::new(&coeffs, &Device::Cpu).unwrap();
        let grads = w
            .as_tensor()
            .mul(&c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // candle also hands back gradients of non-var leaves such as `c`.
        assert!(grads.get(&c).is_some());
        accumulate(&mut acc, &vars, grads, 0.5).unwrap();
        constants.push(c);
    }
    let acc = acc.unwrap();
    assert_eq!(
        acc.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        [2.0, 4.0]
    );
    for c in &constants {
        assert!(
            acc.get(c).is_none(),
            "gradients of non-vars must be dropped"
        );
    }
    assert_eq!(acc.get(w.as_tensor()).unwrap().dtype(), DType::F32);
}

#[test]
fn schedules_match_transformers() {
    // Values from transformers' get_{linear,cosine,constant}_schedule_with_warmup lambdas
    // times the base lr, computed in Python.
    let sched = |kind| LrSchedule {
        base_lr: 1e-4,
        kind,
        warmup_steps: 10,
        total_steps: 100,
    };
    let cases: [(usize, f64, f64); 7] = [
        (0, 0.0, 0.0),
        (3, 3e-05, 3e-05),
        (10, 0.0001, 0.0001),
        (37, 7e-05, 7.938926261462366e-05),
        (55, 5e-05, 5e-05),
        (99, 1.1111111111111112e-06, 3.04586490452119e-08),
        (100, 0.0, 0.0),
    ];
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-30);
    for (step, linear, cosine) in cases {
        assert!(
            close(sched(Schedule::Linear).lr_at(step), linear),
            "linear at {step}"
        );
        assert!(
            close(sched(Schedule::Cosine).lr_at(step), cosine),
            "cosine at {step}"
        );
        let constant = if step < 10 {
            1e-4 * (step as f64 / 10.0)
        } else {
            1e-4
        };
        assert!(
            close(sched(Schedule::Constant).lr_at(step), constant),
            "constant at {step}"
        );
    }
    let no_warmup = LrSchedule {
        base_lr: 2e-5,
        kind: Schedule::Constant,
        warmup_steps: 0,
        total_steps: 5,
    };
    assert_eq!(no_warmup.lr_at(0), 2e-5);
    assert_eq!(
        serde_json::from_str::<Schedule>("\"cosine\"").unwrap(),
        Schedule::Cosine
    );
}
