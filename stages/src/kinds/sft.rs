//! `sft`: supervised fine-tuning (LoRA or full) on chat data, loss on assistant tokens only.
//!
//! Besides plain SFT it carries the study's in-training defences: KL to the reference and
//! LDIFS (see [`crate::train::sft_step`]), an inoculation system prompt used in training
//! only, and safety batches interleaved at a fixed cadence. And it is the sample-matched
//! arm of the RL-vs-SFT comparison: wire the `summary` of an `rl` stage (and of its warm-up)
//! to `match_samples` to train on exactly as many examples as they consumed, and/or wire its
//! `rollouts`
//! with `min_reward` to train on its high-reward completions.
//!
//! Steps are counted in optimizer updates of `batch_size x grad_accum` examples; a run
//! consumes `samples` examples (matched, or `epochs` x dataset size, or `max_steps` worth),
//! walking the data in a seeded order reshuffled every epoch. `snapshot_fractions` saves
//! the adapter at set fractions of the run into output `snapshots` (as `rl` does), for EM
//! over training.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use emflow_engine::context::StageContext;
use emflow_engine::kind::{Kind, KindInfo, ParamError};
use emflow_engine::memory::MemoryDemand;
use emflow_model::{AdamW, LrSchedule, Schedule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::defaults;
use super::memory::trainable;
use crate::formats::messages::{read_conversations, to_model_messages};
use crate::train::batch::SftExample;
use crate::train::interleave::{interleave_setting, Interleave, InterleaveParams};
use crate::train::metrics_log::JsonlLog;
use crate::train::policy::{LoraParams, Policy};
use crate::train::resume::{resume_with_logs, save_checkpoint, Cursor};
use crate::train::setup::{load_policy, optimizer};
use crate::train::sft_step::{sft_step, LdifsParams, SftStepConfig};
use crate::train::snapshots::{check_fractions, Snapshots};
use crate::train::throughput::Throughput;

pub struct SftKind;

/// The `sft` kind's params: the one declaration of their names, types, defaults, ranges
/// and docs (the engine derives the kind's spec from this struct).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SftParams {
    /// LoRA: {r: 32, alpha: 64, rslora: true, dropout: 0, targets: [q_proj..down_proj], layers: null}
    #[serde(default)]
    // `{}`, not the expanded settings: the default every existing key was made with.
    #[schemars(extend("default" = {}))]
    lora: LoraParams,
    /// train every weight instead of a LoRA adapter
    #[serde(default)]
    full_finetune: bool,
    /// peak learning rate (AdamW)
    #[serde(default = "defaults::ratio::<1, 10_000>")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    lr: f64,
    /// learning-rate decay after warm-up
    #[serde(default = "default_schedule")]
    schedule: Schedule,
    /// linear warm-up steps
    #[serde(default = "defaults::int::<5>")]
    warmup_steps: usize,
    /// AdamW weight decay
    #[serde(default = "defaults::ratio::<1, 100>")]
    weight_decay: f64,
    /// passes over the data (ignored when max_steps or match_samples sets the length)
    #[serde(default = "defaults::uint::<1>")]
    #[schemars(range(min = 1))]
    epochs: u64,
    /// optimizer steps to run (overrides epochs)
    #[schemars(range(min = 1))]
    max_steps: Option<u64>,
    /// examples per micro-batch
    #[serde(default = "defaults::int::<4>")]
    #[schemars(range(min = 1))]
    batch_size: usize,
    /// micro-batches per optimizer step
    #[serde(default = "defaults::int::<4>")]
    #[schemars(range(min = 1))]
    grad_accum: usize,
    /// tokens per example; longer ones are truncated (counted in the log)
    #[serde(default = "defaults::int::<2048>")]
    #[schemars(range(min = 2))]
    max_length: usize,
    /// global gradient-norm clip
    #[serde(default = "defaults::ratio::<1, 1>")]
    max_grad_norm: f64,
    /// seed for LoRA init and data order
    #[serde(default)]
    seed: u64,
    /// weight of KL(policy || reference) on assistant tokens (reference = adapter off)
    #[serde(default)]
    kl_lambda: f64,
    /// LDIFS regulariser {lambda, every: 5}: feature distance to the reference at every k-th layer
    ldifs: Option<LdifsParams>,
    /// inoculation prompt: system turn used in training only
    system_prompt: Option<String>,
    /// safety batches from input `safety`: {every: k | share: s, batch_size: 4}
    interleave: Option<InterleaveParams>,
    /// with input `rollouts`: keep completions whose reward is at least this
    min_reward: Option<f64>,
    /// with input `match_samples`: examples added to the matched count (e.g. a warm-up's 100)
    #[serde(default)]
    match_extra: u64,
    /// optimizer steps between resumable checkpoints
    #[serde(default = "defaults::uint::<50>")]
    #[schemars(range(min = 1))]
    checkpoint_every: u64,
    /// recompute activations layer by layer in the backward pass: less GPU memory (the plan's estimate counts it), the same gradients within f32 rounding, about one more forward pass of time
    #[serde(default)]
    // Added after results were cached: at `false` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    gradient_checkpointing: bool,
    /// extra names for the model's chat template, as transformers' apply_chat_template(**kwargs): e.g. {enable_thinking: false} for Qwen3
    #[serde(default)]
    // Added after results were cached: at `{}` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    chat_template_kwargs: emflow_model::TemplateKwargs,
    /// fractions of the run (each in (0, 1), increasing) after which the adapter is saved into output `snapshots`, for EM over training; [] = none
    #[serde(default)]
    // Added after results were cached: at `[]` it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    snapshot_fractions: Vec<f64>,
    /// preventive steering: add steering_alpha x input `steering`'s persona vector at its layer's output in every training pass (not the reference; never saved with the adapter); null = off
    // Added after results were cached: at null it leaves the key as it was.
    #[schemars(extend("x-emflow-key-omits-default" = true))]
    steering_alpha: Option<f64>,
}

fn default_schedule() -> Schedule {
    Schedule::Linear
}

/// Loop state saved in checkpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SftState {
    main_steps: u64,
    safety_steps: u64,
    data_consumed: u64,
    safety_consumed: u64,
    truncated: u64,
}

impl Kind for SftKind {
    type Params = SftParams;

    fn describe(&self) -> KindInfo {
        // 4: a `summary` output, so a sample-matched arm can count a warm-up's examples.
        // 5: metrics under TRL's names (`learning_rate`), safety lines name their `source`.
        KindInfo::new("sft", 5, "supervised fine-tuning (LoRA or full) on chat data, with KL/LDIFS, inoculation and safety interleaving")
            .ports(
                "in   model          model     base model (GGUF file or HF folder)
                 in?  adapter        adapter   LoRA adapter to continue training
                 in?  data           messages  training conversations
                 in?  rollouts       samples   an rl stage's rollouts; with min_reward, its high-reward completions become targets
                 in?  safety         messages  safety conversations for interleaved batches
                 in*  match_samples  summary   summaries of the stages to match (an rl arm, its warm-up): train on the sum of their samples_consumed (+ match_extra) examples
                 in?  steering       dir       a persona_vector stage's vector, added (x steering_alpha) in training passes only
                 out  adapter        adapter   trained LoRA adapter (PEFT layout) or full weights
                 out  metrics        metrics   one JSON object per optimizer step
                 out  summary        summary   samples_consumed, steps, safety steps, truncated examples
                 out  snapshots      dir       adapters at `snapshot_fractions` of the run, with index.json (steps, samples consumed)",
            )
    }

    /// What the declared ranges cannot say: the interleave cadence, and that KL and LDIFS
    /// need a reference (LoRA with the adapter off).
    fn check(&self, p: &SftParams) -> Result<(), Vec<ParamError>> {
        let mut errs = Vec::new();
        let mut bad = |param: &str, message: String| {
            errs.push(ParamError {
                param: param.into(),
                message,
                hint: None,
            })
        };
        if let Some(i) = &p.interleave {
            if let Err(e) = i.cadence() {
                bad("interleave", e.to_string());
            }
        }
        if let Err(e) = check_fractions(&p.snapshot_fractions) {
            bad("snapshot_fractions", e.to_string());
        }
        if p.full_finetune && (p.kl_lambda != 0.0 || p.ldifs.is_some()) {
            bad(
                "full_finetune",
                "KL and LDIFS need LoRA: the reference is the base with the adapter off".into(),
            );
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    fn run(&self, ctx: &mut StageContext, p: &SftParams) -> Result<()> {
        run_sft(ctx, p)
    }

    /// The micro-batch of `batch_size` examples of up to `max_length` tokens.
    fn memory_demand(&self, p: &SftParams) -> Option<MemoryDemand> {
        Some(MemoryDemand {
            training: Some(trainable(&p.lora, p.full_finetune)),
            train_batch: p.batch_size as u64,
            train_tokens: p.max_length as u64,
            sample_batch: 0,
            sample_tokens: 0,
            gradient_checkpointing: p.gradient_checkpointing,
            checkpointing_param: Some("gradient_checkpointing"),
            batch_param: "batch_size",
            length_param: "max_length",
        })
    }
}

/// Training examples from input `rollouts` (an rl stage's JSONL), keeping rewards >= min.
fn rollout_conversations(
    ctx: &StageContext,
    min_reward: Option<f64>,
) -> Result<Vec<Vec<emflow_model::Message>>> {
    let Some(input) = ctx.optional_input("rollouts")? else {
        return Ok(Vec::new());
    };
    let Some(min) = min_reward else {
        bail!("stage {}: input `rollouts` is wired but `min_reward` is not set; say which rollouts to keep", ctx.stage_id)
    };
    let (kept, _) = crate::formats::rollouts::read_kept(&input.path, &input.origin, min)?;
    Ok(kept)
}

fn matched_samples(ctx: &StageContext, extra: u64) -> Result<Option<u64>> {
    let inputs = ctx.inputs("match_samples");
    if inputs.is_empty() {
        return Ok(None);
    }
    let mut total = extra;
    for input in inputs {
        let text = std::fs::read_to_string(&input.path)
            .with_context(|| format!("reading {}", input.origin))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", input.origin))?;
        total += v["samples_consumed"].as_u64().with_context(|| {
            format!(
                "{} has no integer `samples_consumed`; wire an rl or sft stage's `summary` output",
                input.origin
            )
        })?;
    }
    Ok(Some(total))
}

/// The training conversations: input `data` and/or the kept rollouts, under the
/// inoculation `system_prompt` if set.
fn training_conversations(
    ctx: &StageContext,
    p: &SftParams,
) -> Result<Vec<Vec<emflow_model::Message>>> {
    let mut convs: Vec<Vec<emflow_model::Message>> = Vec::new();
    if let Some(data) = ctx.optional_input("data")? {
        for c in read_conversations(data)? {
            convs.push(to_model_messages(&c, p.system_prompt.as_deref()));
        }
    }
    for mut c in rollout_conversations(ctx, p.min_reward)? {
        if let Some(s) = &p.system_prompt {
            c.retain(|m| m.role != "system");
            c.insert(0, emflow_model::Message::system(s.clone()));
        }
        convs.push(c);
    }
    ensure!(
        !convs.is_empty(),
        "stage {}: no training conversations: wire `data`, or `rollouts` with a `min_reward` some rollouts reach",
        ctx.stage_id
    );
    Ok(convs)
}

/// The training examples, cut to `max_length` tokens, and how many were cut.
fn training_examples(
    ctx: &StageContext,
    p: &SftParams,
    policy: &Policy,
) -> Result<(Vec<SftExample>, u64)> {
    let convs = training_conversations(ctx, p)?;
    let mut examples = Vec::with_capacity(convs.len());
    let mut truncated = 0u64;
    for c in &convs {
        let (ex, cut) = SftExample::encode(&policy.lm, c, Some(p.max_length))?;
        truncated += cut as u64;
        examples.push(ex);
    }
    if truncated > 0 {
        ctx.progress().log(&format!(
            "warning: {truncated} of {} examples truncated to {} tokens",
            examples.len(),
            p.max_length
        ));
    }
    Ok((examples, truncated))
}

fn run_sft(ctx: &mut StageContext, p: &SftParams) -> Result<()> {
    let progress = ctx.progress_handle();
    progress.phase("loading", 0, "");
    let mut policy = load_policy(ctx, &p.lora, p.full_finetune, p.seed)?;
    policy.lm.chat.set_kwargs(p.chat_template_kwargs.clone())?;
    crate::train::steering::install(ctx, p.steering_alpha, &mut policy)?;
    let (examples, truncated) = training_examples(ctx, p, &policy)?;
    let safety = interleave_setting(p.interleave.as_ref())?;
    let mut safety = Interleave::load(ctx, safety, &policy, Some(p.max_length), p.seed)?;

    let per_step = (p.batch_size * p.grad_accum) as u64;
    let samples = match matched_samples(ctx, p.match_extra)? {
        Some(n) => n,
        None => match p.max_steps {
            Some(steps) => steps * per_step,
            None => p.epochs * examples.len() as u64,
        },
    };
    ensure!(
        samples > 0,
        "stage {}: nothing to train (0 samples)",
        ctx.stage_id
    );
    let mut opt = optimizer(&policy, p.weight_decay)?;
    let schedule = LrSchedule {
        base_lr: p.lr,
        kind: p.schedule,
        warmup_steps: p.warmup_steps,
        total_steps: samples.div_ceil(per_step) as usize,
    };

    let logs = [("metrics", ctx.output_path("metrics"))];
    let (resumed, mut logs) =
        resume_with_logs::<SftState>(&ckpt_root(ctx), &mut policy, &mut opt, &logs)?;
    if let Some(r) = &resumed {
        progress.log(&format!(
            "resuming from checkpoint at step {}",
            r.main_steps + r.safety_steps
        ));
    }
    let state = resumed.unwrap_or(SftState {
        truncated,
        ..Default::default()
    });
    if let Some(s) = safety.as_mut() {
        s.seek(state.safety_consumed);
    }
    let mut run = SftRun {
        data: Cursor::new(examples.len(), p.seed, "data", state.data_consumed),
        examples,
        per_step,
        metrics: logs.remove(0),
        speed: Throughput::default(),
        step_cfg: SftStepConfig {
            micro_batch: p.batch_size,
            kl_lambda: p.kl_lambda,
            ldifs: p.ldifs.clone(),
            max_grad_norm: p.max_grad_norm,
            gradient_checkpointing: p.gradient_checkpointing,
        },
        snapshots: Snapshots::plan(
            ctx.checkpoint_dir().join("sft-snapshots"),
            &p.snapshot_fractions,
            samples.div_ceil(per_step),
        ),
        policy,
        opt,
        schedule,
        safety,
        state,
    };
    run.train(ctx, samples, p.checkpoint_every)?;
    run.finish(ctx)
}

fn ckpt_root(ctx: &StageContext) -> std::path::PathBuf {
    ctx.checkpoint_dir().join("sft")
}

/// An SFT run in progress: the policy and its optimizer, the data walks, the loop state.
struct SftRun {
    policy: Policy,
    opt: AdamW,
    schedule: LrSchedule,
    step_cfg: SftStepConfig,
    examples: Vec<SftExample>,
    /// Examples per main step (`batch_size x grad_accum`).
    per_step: u64,
    data: Cursor,
    safety: Option<Interleave>,
    state: SftState,
    metrics: JsonlLog,
    snapshots: Snapshots,
    /// Tokens trained per second, main and safety steps (the log and the stage record only).
    speed: Throughput,
}

impl SftRun {
    /// Main steps until `samples` examples are consumed, each followed by the safety steps
    /// due after it and, every `checkpoint_every` steps, a checkpoint.
    fn train(&mut self, ctx: &StageContext, samples: u64, checkpoint_every: u64) -> Result<()> {
        let total_steps = samples.div_ceil(self.per_step);
        let progress = ctx.progress_handle();
        progress.phase("training", total_steps, "steps");
        progress.inc(self.state.main_steps);
        while self.state.main_steps < total_steps {
            let want = (samples - self.data.consumed).min(self.per_step) as usize;
            let lr = self.main_step(ctx, want)?;
            self.safety_steps(ctx, lr)?;
            let main_steps = self.state.main_steps;
            let policy = &self.policy;
            self.snapshots
                .take(main_steps, self.state.data_consumed, |dir| policy.save(dir))?;
            if main_steps.is_multiple_of(checkpoint_every) && main_steps < total_steps {
                let logs = [&self.metrics];
                save_checkpoint(&ckpt_root(ctx), &self.policy, &self.opt, &self.state, &logs)?;
                ctx.check_interrupt()?;
            }
        }
        Ok(())
    }

    /// One main step on the next `want` examples; returns its learning rate.
    fn main_step(&mut self, ctx: &StageContext, want: usize) -> Result<f64> {
        let started = Instant::now();
        let batch: Vec<SftExample> = self
            .data
            .take(want)
            .into_iter()
            .map(|(i, _)| self.examples[i].clone())
            .collect();
        let step = self.state.main_steps + self.state.safety_steps;
        let lr = self.schedule.lr_at(self.state.main_steps as usize);
        let stats = sft_step(&mut self.policy, &batch, &self.step_cfg, &mut self.opt, lr)
            .with_context(|| format!("stage {}: SFT step {step}", ctx.stage_id))?;
        self.state.main_steps += 1;
        self.state.data_consumed = self.data.consumed;
        let tok_s = self
            .speed
            .add(stats.tokens as u64, started.elapsed().as_secs_f64());
        let data = &self.data;
        self.metrics.append(&json!({
            "step": step, "batch": "main", "loss": stats.loss, "nll": stats.nll, "kl": stats.kl, "ldifs": stats.ldifs,
            "learning_rate": lr, "grad_norm": stats.grad_norm, "tokens": stats.tokens, "target_tokens": stats.target_tokens,
            "samples_consumed": data.consumed, "epoch": data.epoch(),
        }))?;
        // Speed goes to the live message, never into an output: outputs must be the same bytes
        // on every run (`emflow verify`), and wall-clock figures are not.
        let progress = ctx.progress();
        progress.message(&format!("loss {:.4} · {tok_s:.0} tok/s", stats.loss));
        progress.inc(1);
        Ok(lr)
    }

    /// The safety steps due after the main step just taken, at its learning rate `lr`.
    fn safety_steps(&mut self, ctx: &StageContext, lr: f64) -> Result<()> {
        let Some(safety) = self.safety.as_mut() else {
            return Ok(());
        };
        for _ in 0..safety.steps_after(self.state.main_steps) {
            let batch = safety.next_batch();
            let started = Instant::now();
            let s = sft_step(&mut self.policy, &batch, &self.step_cfg, &mut self.opt, lr)
                .with_context(|| {
                    format!(
                        "stage {}: safety step after main step {}",
                        ctx.stage_id, self.state.main_steps
                    )
                })?;
            self.speed
                .add(s.tokens as u64, started.elapsed().as_secs_f64());
            let step = self.state.main_steps + self.state.safety_steps;
            self.state.safety_steps += 1;
            self.state.safety_consumed = safety.consumed();
            self.metrics.append(&json!({
                "step": step, "batch": "safety", "source": safety.source(), "loss": s.loss, "nll": s.nll, "kl": s.kl,
                "ldifs": s.ldifs, "learning_rate": lr, "grad_norm": s.grad_norm, "tokens": s.tokens,
                "safety_consumed": safety.consumed(),
            }))?;
        }
        Ok(())
    }

    /// Writes the adapter, the snapshots and the summary.
    fn finish(self, ctx: &mut StageContext) -> Result<()> {
        self.policy.save(&ctx.output_path("adapter"))?;
        self.snapshots
            .publish(&ctx.output_path("snapshots"), self.state.main_steps)?;
        let state = &self.state;
        let summary = json!({
            "samples_consumed": state.data_consumed,
            "steps": state.main_steps + state.safety_steps,
            "safety_steps": state.safety_steps,
            "truncated_examples": state.truncated,
        });
        super::write_summary(ctx, summary)?;
        self.speed.summarize(ctx, "train_tokens_per_s");
        Ok(())
    }
}
