//! The CUDA path against the CPU path: the same random-weight models (real architectures) give
//! the same logits within bf16 tolerance, train with gradients on every LoRA tensor, and repeat
//! bit for bit on one device. Built only with `--features cuda`; without a visible GPU each test
//! says so and passes, unless EMFLOW_REQUIRE_GPU=1 (scripts/gpu-check.sh sets it).

use crate::common::*;
use candle_core::{DType, Tensor};
use emflow_model::{Arch, DeviceSetup, LoraConfig, ModelConfig, Transformer};

fn gpu() -> Option<DeviceSetup> {
    match emflow_model::setup(Some(0)) {
        Ok(setup) => Some(setup),
        Err(e) if std::env::var_os("EMFLOW_REQUIRE_GPU").is_some() => {
            panic!("EMFLOW_REQUIRE_GPU is set but CUDA device 0 cannot be opened: {e:#}")
        }
        Err(e) => {
            eprintln!("skipping: no CUDA device 0 ({e:#})");
            None
        }
    }
}

fn batch() -> (Tensor, Tensor) {
    let rows: Vec<Vec<u32>> = (0..3)
        .map(|r| (0..12).map(|i| (i * 31 + r * 17 + 3) % 256).collect())
        .collect();
    (ids(&rows), ones(3, 12))
}

/// Largest absolute difference relative to the largest absolute CPU value (`logits` are f32).
fn relative_diff(cpu: &Tensor, gpu: &Tensor) -> f32 {
    let gpu = gpu.to_device(&candle_core::Device::Cpu).unwrap();
    max_abs_diff(cpu, &gpu) / max_abs_diff(cpu, &cpu.zeros_like().unwrap()).max(1e-6)
}

#[test]
fn logits_match_the_cpu_within_bf16_tolerance() {
    let Some(setup) = gpu() else { return };
    for arch in [Arch::Llama, Arch::Qwen2] {
        let cfg = ModelConfig::tiny(arch);
        let on_cpu = Transformer::random(&cfg, &cpu(), 5).unwrap();
        let on_gpu = Transformer::random(&cfg, &setup, 5).unwrap();
        let (ids, mask) = batch();
        let want = on_cpu.forward_eval(&ids, &mask).unwrap();
        let (gids, gmask) = (
            ids.to_device(&setup.device).unwrap(),
            mask.to_device(&setup.device).unwrap(),
        );
        let eval = on_gpu.forward_eval(&gids, &gmask).unwrap();
        let train = on_gpu.forward_train(&gids, &gmask).unwrap();
        for (mode, got) in [("eval", eval), ("train", train)] {
            let d = relative_diff(&want, &got);
            assert!(
                d < 0.03,
                "{arch:?} {mode}: logits differ by {d} of their range"
            );
        }
    }
}

#[test]
fn lora_training_reaches_every_adapter_tensor_on_the_gpu() {
    let Some(setup) = gpu() else { return };
    let mut model = Transformer::random(&ModelConfig::tiny(Arch::Qwen2), &setup, 6).unwrap();
    model
        .add_lora(&LoraConfig::all_linears(4, 8.0, false), 1)
        .unwrap();
    for (name, var) in model.trainable_vars() {
        assert_eq!(var.dtype(), DType::F32, "{name}: master weights stay f32");
        if name.contains("lora_B") {
            let noise = Tensor::randn(0f32, 0.05, var.shape(), var.device()).unwrap();
            var.set(&noise).unwrap();
        }
    }
    let (ids, mask) = batch();
    let (ids, mask) = (
        ids.to_device(&setup.device).unwrap(),
        mask.to_device(&setup.device).unwrap(),
    );
    let logits = model.forward_train(&ids, &mask).unwrap();
    let loss = logits
        .to_dtype(DType::F32)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_every_var_has_a_gradient(&model.trainable_vars(), &grads);
}

#[test]
fn the_same_inputs_give_the_same_bits_twice_on_one_device() {
    let Some(setup) = gpu() else { return };
    let model = Transformer::random(&ModelConfig::tiny(Arch::Llama), &setup, 7).unwrap();
    let (ids, mask) = batch();
    let (ids, mask) = (
        ids.to_device(&setup.device).unwrap(),
        mask.to_device(&setup.device).unwrap(),
    );
    let a = model.forward_eval(&ids, &mask).unwrap();
    let b = model.forward_eval(&ids, &mask).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}
