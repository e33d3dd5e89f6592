//! `cargo run -p emflow-model --example checkpoint_memory [-- LAYERS SEQ BATCH]`: the memory
//! one training step of a random-weight model takes with and without activation
//! checkpointing (`Transformer::train_backward`), on the CPU in f32, with LoRA on every
//! projection.
//!
//! Peak RSS is per process, so each mode runs in a child process of this example (argument
//! `--mode plain|checkpointed`); each child prints its resident memory before the step (the
//! weights) and its peak after, and the parent prints both and the saving. The shape is a
//! small Llama-style decoder (hidden 256, 8 heads) so a step takes seconds on two cores.

use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use emflow_model::{Arch, LoraConfig, ModelConfig, Transformer};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--mode") {
        let mode = args
            .get(i + 1)
            .context("--mode needs plain or checkpointed")?;
        let shape: Vec<String> = args[..i].to_vec();
        return child(mode == "checkpointed", &parse_shape(&shape)?);
    }
    let shape = parse_shape(&args)?;
    println!(
        "one LoRA training step, {} layers, batch {} x {} tokens, hidden 256, f32 on the CPU",
        shape[0], shape[2], shape[1]
    );
    let mut grown = Vec::new();
    for mode in ["plain", "checkpointed"] {
        let out = Command::new(std::env::current_exe()?)
            .args(shape.iter().map(|n| n.to_string()))
            .args(["--mode", mode])
            .output()?;
        if !out.status.success() {
            bail!("{mode}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let line = String::from_utf8(out.stdout)?;
        let nums: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let [before, peak, loss] = nums[..] else {
            bail!("{mode}: unexpected output {line:?}");
        };
        println!(
            "{mode:>13}: RSS before the step {before:8.1} MiB, peak {peak:8.1} MiB, step added {:8.1} MiB (loss {loss:.6})",
            peak - before
        );
        grown.push(peak - before);
    }
    println!(
        "checkpointing used {:.1}% of the plain step's added memory",
        100.0 * grown[1] / grown[0]
    );
    Ok(())
}

/// `[layers, seq, batch]` from the arguments, or the defaults.
fn parse_shape(args: &[String]) -> Result<Vec<usize>> {
    let defaults = [8usize, 512, 2];
    (0..3)
        .map(|i| match args.get(i) {
            Some(a) => a.parse().with_context(|| format!("{a:?} is not a count")),
            None => Ok(defaults[i]),
        })
        .collect()
}

/// One step in this process; prints "RSS-before peak loss" in MiB.
fn child(checkpointed: bool, shape: &[usize]) -> Result<()> {
    let (layers, seq, batch) = (shape[0], shape[1], shape[2]);
    let cfg = ModelConfig {
        vocab_size: 4096,
        hidden_size: 256,
        intermediate_size: 704,
        num_layers: layers,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 32,
        max_position: seq.max(512),
        rope_scaling: None,
        ..ModelConfig::tiny(Arch::Llama)
    };
    let setup = emflow_model::setup(None)?;
    let mut model = Transformer::random(&cfg, &setup, 1)?;
    model.add_lora(&LoraConfig::all_linears(16, 32.0, false), 2)?;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i * 7919 % 4000 + 50) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?;
    let mask = Tensor::ones((batch, seq), candle_core::DType::F32, &Device::Cpu)?;
    let targets = ids.narrow(1, 1, seq - 1)?.contiguous()?;
    let before = status_mib("VmRSS:")?;
    let (loss, grads) = model.train_backward(&ids, &mask, &[], checkpointed, |pass| {
        let scores = pass.scores((0, seq - 1), &targets, 1.0)?;
        Ok(scores.logprobs.mean_all()?.neg()?)
    })?;
    let loss = loss.to_scalar::<f32>()?;
    drop(grads);
    println!("{before} {} {loss}", status_mib("VmHWM:")?);
    Ok(())
}

/// A memory line of /proc/self/status in MiB.
fn status_mib(key: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in /proc/self/status"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?;
    Ok(kib / 1024.0)
}
