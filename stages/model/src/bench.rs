//! `emflow bench model` / `cargo bench -p emflow-model`: throughput of the model layer on this
//! machine for SmolLM2-135M (dequantised GGUF; or random weights in a published shape, on the
//! CPU or a CUDA device): prefill, decode at batch 1 and 16, and training steps (LoRA r=8 and
//! full fine-tuning, forward + backward + AdamW on 4 x 128 tokens). `--only kernels` prints
//! instead the GFLOPS of the decode-step products on SmolLM2's shapes, panel kernel against the
//! `gemm` crate, with no model loaded.
//!
//! Decode is timed on the same prefill/step path `generate` uses, with end-of-sequence ignored so
//! every row decodes the same number of steps.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rayon::prelude::*;

use crate::generate::{RowSampler, SamplingParams};
use crate::optim::{AdamW, AdamWConfig};
use crate::transformer::LoraConfig;
use crate::transformer::ModelConfig;
use crate::transformer::{Mode, Transformer};

const USAGE: &str = "usage: emflow bench model [--model PATH.gguf|HF_DIR | --random smollm2-135m|qwen2.5-0.5b] [--cuda ORDINAL] [--steps N] [--only prefill|decode|lora|full|kernels]";

struct Args {
    model: Option<PathBuf>,
    /// Random weights in a published shape instead of a weights file.
    random: Option<String>,
    /// CUDA device ordinal; None runs on the CPU.
    cuda: Option<usize>,
    decode_steps: usize,
    /// Run only this part; None runs all.
    only: Option<String>,
}

impl Args {
    fn runs(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == part)
    }
}

fn parse(args: &[String]) -> Result<Args> {
    let mut out = Args {
        model: None,
        random: None,
        cuda: None,
        decode_steps: 64,
        only: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => out.model = Some(PathBuf::from(it.next().context(USAGE)?)),
            "--random" => {
                let name = it.next().context(USAGE)?;
                if ModelConfig::named_shape(name).is_none() {
                    bail!("unknown shape {name:?} for --random; {USAGE}");
                }
                out.random = Some(name.clone());
            }
            "--cuda" => {
                out.cuda = Some(
                    it.next()
                        .context(USAGE)?
                        .parse()
                        .with_context(|| format!("--cuda takes a device ordinal; {USAGE}"))?,
                )
            }
            "--steps" => {
                out.decode_steps = it
                    .next()
                    .context(USAGE)?
                    .parse()
                    .with_context(|| format!("--steps must be a number; {USAGE}"))?
            }
            "--only" => {
                let part = it.next().context(USAGE)?;
                if !["prefill", "decode", "lora", "full", "kernels"].contains(&part.as_str()) {
                    bail!("unknown part {part:?} for --only; {USAGE}");
                }
                out.only = Some(part.clone());
            }
            "--bench" => {} // passed by `cargo bench`
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    if out.model.is_some() && out.random.is_some() {
        bail!("--model and --random exclude each other; {USAGE}");
    }
    Ok(out)
}

fn default_model() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("EMFLOW_TEST_GGUF") {
        return Ok(PathBuf::from(p));
    }
    crate::testing::smollm2_gguf().context(
        "no SmolLM2 weights: pass --model PATH, or set EMFLOW_TEST_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Deterministic pseudo-token ids below `vocab`.
fn token_ids(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 13) % (vocab - 100) + 100) as u32)
        .collect()
}

/// Seconds for one prefill of `prompts` and for `steps` decode steps after it.
fn time_decode(
    model: &Transformer,
    prompts: &[Vec<u32>],
    steps: usize,
    params: &SamplingParams,
) -> Result<(f64, f64)> {
    let b = prompts.len();
    let len = prompts[0].len();
    let start = Instant::now();
    let mut cache = model.kv_cache(None, b, len + steps + 1)?;
    let ids = Tensor::from_vec(prompts.concat(), (b, len), model.device())?;
    let mut valid = vec![vec![true; len]; b];
    let h = model.hidden_eval(&ids, &valid, Some(&mut cache))?;
    let mut logits = model
        .logits(&h.narrow(1, len - 1, 1)?, Mode::Eval)?
        .squeeze(1)?;
    let mut samplers: Vec<RowSampler> = (0..b).map(|i| RowSampler::new(i as u64)).collect();
    let mut next = |logits: &Tensor| -> Result<Vec<u32>> {
        if params.temperature == 0.0 {
            Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
        } else {
            let host = logits.to_vec2::<f32>()?;
            Ok(samplers
                .par_iter_mut()
                .zip(host.par_iter())
                .map(|(s, l)| s.sample(l, params))
                .collect())
        }
    };
    let mut tokens = next(&logits)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..steps {
        for v in valid.iter_mut() {
            v.push(true);
        }
        let ids = Tensor::from_vec(tokens, (b, 1), model.device())?;
        let h = model.hidden_eval(&ids, &valid, Some(&mut cache))?;
        logits = model.logits(&h, Mode::Eval)?.squeeze(1)?;
        tokens = next(&logits)?;
    }
    Ok((prefill, start.elapsed().as_secs_f64()))
}

/// How many of the model's decode weights are multiplied from which form, e.g.
/// "210 from 4-bit codes, 1 from 8-bit codes".
fn describe_decode_weights(model: &Transformer) -> Result<String> {
    let bits = model.decode_weight_bits()?;
    let mut parts = Vec::new();
    for (b, form) in [
        (Some(4), "from 4-bit codes"),
        (Some(8), "from 8-bit codes"),
        (Some(32), "f32"),
        (None, "not packed (trainable or off the CPU)"),
    ] {
        let count = bits.iter().filter(|&&x| x == b).count();
        if count > 0 {
            parts.push(format!("{count} {form}"));
        }
    }
    Ok(parts.join(", "))
}

/// GFLOPS of the decode-step products at 1, 4 and 16 rows on SmolLM2's shapes, by kernel:
/// the panel kernel decode uses and the `gemm` crate the other passes use.
fn bench_kernels() {
    use crate::ops::cpu::CodedPanels;
    use crate::ops::cpu::PanelMatrix;
    use crate::ops::cpu::{gemm_new, MatRef};
    let time = |f: &mut dyn FnMut(), flops: f64| {
        f();
        let reps = ((2e9 / flops) as usize).clamp(3, 2000);
        let start = Instant::now();
        for _ in 0..reps {
            f();
        }
        flops * reps as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    println!(
        "decode-step products, GFLOPS (panel: decode's kernel on f32 panels; codes: on 4-bit \
         codes; gemm: the gemm crate's):"
    );
    for (k, n, what) in [
        (576, 576, "q/o proj"),
        (576, 192, "k/v proj"),
        (576, 1536, "gate/up "),
        (1536, 576, "down    "),
        (576, 49152, "LM head "),
    ] {
        // Values on a 4-bit grid (scale 1/64, offset -1/8), as a Q4_1 file gives them.
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7 + i / 13) % 16) as f32 / 64.0 - 0.125)
            .collect();
        let packed = PanelMatrix::from_in_out(&w, k, n);
        let Some(coded) = CodedPanels::find(|kk, j| w[kk * n + j], k, n) else {
            unreachable!("a 4-bit grid has 4-bit codes")
        };
        let mut line = format!("  {what} {k:>4}x{n:<5}");
        for m in [1usize, 4, 16] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) / 13.0).collect();
            let flops = 2.0 * (m * k * n) as f64;
            let panel = time(
                &mut || drop(std::hint::black_box(packed.matmul(&x, m))),
                flops,
            );
            let codes = time(
                &mut || drop(std::hint::black_box(coded.matmul(&x, m))),
                flops,
            );
            let gemm = time(
                &mut || {
                    drop(std::hint::black_box(gemm_new(
                        (m, n, k),
                        MatRef::rows(&x, k),
                        MatRef::rows(&w, n),
                        1.0,
                    )))
                },
                flops,
            );
            line += &format!("  m={m:<2} panel {panel:>5.1} codes {codes:>5.1} gemm {gemm:>5.1}");
        }
        println!("{line}");
    }
}

/// Where a training step's time went, in seconds.
struct TrainTiming {
    forward: f64,
    backward: f64,
    optimizer: f64,
}

impl TrainTiming {
    fn total(&self) -> f64 {
        self.forward + self.backward + self.optimizer
    }

    fn split(&self) -> String {
        format!(
            "forward {:.2} s, backward {:.2} s, AdamW {:.2} s",
            self.forward, self.backward, self.optimizer
        )
    }
}

/// Mean seconds of each part of a training step (forward with the SFT loss, backward, AdamW)
/// on `batch` x `len` tokens, after one warm-up step.
fn time_train(model: &Transformer, batch: usize, len: usize, steps: usize) -> Result<TrainTiming> {
    let vocab = model.config().vocab_size;
    let ids: Vec<u32> = (0..batch)
        .flat_map(|b| token_ids(len, vocab, b + 1))
        .collect();
    let ids = Tensor::from_vec(ids, (batch, len), model.device())?;
    let mask = Tensor::ones((batch, len), candle_core::DType::F32, model.device())?;
    let targets = ids.narrow(1, 1, len - 1)?.contiguous()?;
    let loss_mask = mask.narrow(1, 1, len - 1)?.contiguous()?;
    let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default())?;
    let mut timing = TrainTiming {
        forward: 0.0,
        backward: 0.0,
        optimizer: 0.0,
    };
    // CUDA queues work: synchronise before reading each clock.
    let lap = |clock: &mut Instant| -> Result<f64> {
        model.device().synchronize()?;
        let secs = clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        Ok(secs)
    };
    for step in 0..=steps {
        let mut clock = Instant::now();
        // The SFT stage's pass and loss: next-token cross-entropy over every position.
        let scores = model.forward_train_scores(&ids, &mask, &[], (0, len - 1), &targets, 1.0)?;
        let loss = crate::losses::masked_mean(&scores.logprobs.neg()?, &loss_mask)?;
        let forward = lap(&mut clock)?;
        let grads = loss.backward()?;
        let backward = lap(&mut clock)?;
        opt.step(&grads, 1e-5)?;
        let optimizer = lap(&mut clock)?;
        // Step 0 is a warm-up (first-touch allocations), not counted.
        if step > 0 {
            timing.forward += forward / steps as f64;
            timing.backward += backward / steps as f64;
            timing.optimizer += optimizer / steps as f64;
        }
    }
    Ok(timing)
}

/// Print the model-layer figures for SmolLM2 (or `--model`) on this machine.
pub fn bench_model(args: &[String]) -> Result<()> {
    let args = parse(args)?;
    if args.only.as_deref() == Some("kernels") {
        bench_kernels();
        return Ok(());
    }
    let setup = crate::device::setup(args.cuda)?;
    let source = match (&args.random, &args.model) {
        (Some(name), _) => format!("random weights in the {name} shape"),
        (None, Some(p)) => p.display().to_string(),
        (None, None) => default_model()?.display().to_string(),
    };
    let load = || -> Result<Transformer> {
        match &args.random {
            Some(name) => {
                let cfg = ModelConfig::named_shape(name)
                    .with_context(|| format!("unknown shape {name:?}"))?;
                Transformer::random(&cfg, &setup, 0)
            }
            None => Ok(crate::load(Path::new(&source), &setup)?.model),
        }
    };
    println!("model: {source}");
    match args.cuda {
        Some(ordinal) => println!("device: CUDA {ordinal} (bf16 compute, f32 master weights)"),
        None => println!(
            "device: CPU, {} threads (rayon; set RAYON_NUM_THREADS to change)",
            rayon::current_num_threads()
        ),
    }
    let start = Instant::now();
    let model = load()?;
    println!("load: {:.2} s", start.elapsed().as_secs_f64());
    bench_generation(&model, &args)?;
    drop(model);
    bench_training(&args, &load)?;
    match peak_rss_mib() {
        Some(m) => println!("peak RSS: {m:.0} MiB"),
        None => println!("peak RSS: unavailable (no /proc/self/status)"),
    }
    Ok(())
}

/// Prefill and decode throughput (after warm-up passes).
fn bench_generation(model: &Transformer, args: &Args) -> Result<()> {
    let vocab = model.config().vocab_size;
    let greedy = SamplingParams::greedy(args.decode_steps);

    if args.runs("prefill") {
        // Prefill: one 256-token sequence (after a warm-up pass).
        let prompt = vec![token_ids(256, vocab, 0)];
        time_decode(model, &prompt, 0, &greedy)?;
        let (prefill, _) = time_decode(model, &prompt, 0, &greedy)?;
        println!(
            "prefill: {:.0} tok/s (1 x 256 tokens in {:.3} s)",
            256.0 / prefill,
            prefill
        );
    }
    if args.runs("decode") {
        // Warm-up: the first decode step makes the weight copies decode multiplies by.
        time_decode(model, &[token_ids(8, vocab, 9)], 2, &greedy)?;
        println!("decode weights: {}", describe_decode_weights(model)?);
        let steps = args.decode_steps;
        for (batch, params, label) in [
            (1, greedy.clone(), "greedy"),
            (16, greedy.clone(), "greedy"),
            (
                16,
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.9,
                    ..greedy.clone()
                },
                "T=0.8 top_p=0.9",
            ),
        ] {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|b| token_ids(32, vocab, b)).collect();
            let (_, decode) = time_decode(model, &prompts, steps, &params)?;
            println!(
                "decode batch {batch:>2} ({label}): {:.1} tok/s ({steps} steps after a 32-token prompt, {:.1} ms/step)",
                (batch * steps) as f64 / decode,
                1000.0 * decode / steps as f64
            );
        }
    }
    Ok(())
}

/// Training-step throughput with a LoRA adapter and with full fine-tuning, each on a freshly
/// loaded model.
fn bench_training(args: &Args, load: &dyn Fn() -> Result<Transformer>) -> Result<()> {
    let (batch, len, train_steps) = (4, 128, 3);
    let train = |what: &str, model: &Transformer| -> Result<()> {
        let t = time_train(model, batch, len, train_steps)?;
        println!(
            "train {what}: {:.0} tok/s ({batch} x {len} tokens, {:.2} s/step: {})",
            (batch * len) as f64 / t.total(),
            t.total(),
            t.split()
        );
        Ok(())
    };
    if args.runs("lora") {
        let mut lora_model = load()?;
        lora_model.add_lora(&LoraConfig::all_linears(8, 16.0, false), 0)?;
        train("LoRA r=8 (all linears)", &lora_model)?;
    }
    if args.runs("full") {
        let mut full = load()?;
        full.enable_full_finetune()?;
        train("full fine-tune", &full)?;
    }
    Ok(())
}
