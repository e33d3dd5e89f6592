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
//! walking the data in a seeded order reshuffled every epoch.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use emflow_engine::context::StageContext;
use emflow_engine::kind::{ArtifactType, Kind, KindInfo, ParamError, PortSpec};
use emflow_model::{encode_chat, AdamW, AdamWConfig, LrSchedule, Schedule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::defaults;
use crate::train::batch::SftExample;
use crate::train::metrics_log::JsonlLog;
use crate::train::policy::{load_policy, LoraParams, Policy};
use crate::train::run::{read_conversations, resume, save_checkpoint, to_model_messages, Cursor};
use crate::train::schedule::Cadence;
use crate::train::sft_step::{sft_step, LdifsParams, SftStepConfig};

pub struct SftKind;

/// Interleaved safety batches: `every: k` main steps, or a `share` of all steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InterleaveParams {
    /// Main steps per safety step.
    #[serde(default)]
    pub every: Option<u64>,
    /// Share of all steps that are safety steps (0..1).
    #[serde(default)]
    pub share: Option<f64>,
    /// Examples per safety step.
    #[serde(default = "defaults::int::<4>")]
    pub batch_size: usize,
}

impl InterleaveParams {
    pub fn cadence(&self) -> Result<Cadence> {
        let c = match (self.every, self.share) {
            (Some(k), None) => Cadence::Every(k),
            (None, Some(s)) => Cadence::Share(s),
            _ => bail!("interleave: give exactly one of `every` (main steps per safety step) or `share` (0..1)"),
        };
        c.validate()?;
        ensure!(
            self.batch_size >= 1,
            "interleave.batch_size must be at least 1"
        );
        Ok(c)
    }
}

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
    #[serde(default)]
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
    #[serde(default)]
    ldifs: Option<LdifsParams>,
    /// inoculation prompt: system turn used in training only
    #[serde(default)]
    system_prompt: Option<String>,
    /// safety batches from input `safety`: {every: k | share: s, batch_size: 4}
    #[serde(default)]
    interleave: Option<InterleaveParams>,
    /// with input `rollouts`: keep completions whose reward is at least this
    #[serde(default)]
    min_reward: Option<f64>,
    /// with input `match_samples`: examples added to the matched count (e.g. a warm-up's 100)
    #[serde(default)]
    match_extra: u64,
    /// optimizer steps between resumable checkpoints
    #[serde(default = "defaults::uint::<50>")]
    #[schemars(range(min = 1))]
    checkpoint_every: u64,
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
        KindInfo::new("sft", 4, "supervised fine-tuning (LoRA or full) on chat data, with KL/LDIFS, inoculation and safety interleaving")
            .inputs(vec![
                PortSpec::input("model", ArtifactType::Model, "base model (GGUF file or HF folder)"),
                PortSpec::optional_input("adapter", ArtifactType::Adapter, "LoRA adapter to continue training"),
                PortSpec::optional_input("data", ArtifactType::Messages, "training conversations"),
                PortSpec::optional_input("rollouts", ArtifactType::Samples, "an rl stage's rollouts; with min_reward, its high-reward completions become targets"),
                PortSpec::optional_input("safety", ArtifactType::Messages, "safety conversations for interleaved batches"),
                PortSpec::many_input("match_samples", ArtifactType::Summary, "summaries of the stages to match (an rl arm, its warm-up): train on the sum of their samples_consumed (+ match_extra) examples"),
            ])
            .outputs(vec![
                PortSpec::output("adapter", ArtifactType::Adapter, "trained LoRA adapter (PEFT layout) or full weights"),
                PortSpec::output("metrics", ArtifactType::Metrics, "one JSON object per optimizer step"),
                PortSpec::output("summary", ArtifactType::Summary, "samples_consumed, steps, safety steps, truncated examples"),
            ])
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
}

/// One training example from a conversation, truncated to `max_length`.
fn encode_example(
    policy: &Policy,
    conv: &[emflow_model::Message],
    max_length: usize,
) -> Result<(SftExample, bool)> {
    let enc = encode_chat(&policy.lm.tokenizer, &policy.lm.chat, conv)?;
    let mut ex = SftExample {
        ids: enc.ids,
        target: enc.assistant_mask,
    };
    let truncated = ex.ids.len() > max_length;
    ex.ids.truncate(max_length);
    ex.target.truncate(max_length);
    Ok((ex, truncated))
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
    let text = std::fs::read_to_string(&input.path)
        .with_context(|| format!("reading {}", input.origin))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", input.origin, i + 1))?;
        let reward = row["reward"]
            .as_f64()
            .with_context(|| format!("{}:{}: no numeric `reward`", input.origin, i + 1))?;
        if reward < min {
            continue;
        }
        let prompt: Vec<emflow_model::Message> = serde_json::from_value(row["prompt"].clone())
            .with_context(|| {
                format!(
                    "{}:{}: `prompt` is not a list of messages",
                    input.origin,
                    i + 1
                )
            })?;
        let completion = row["completion"]
            .as_str()
            .with_context(|| format!("{}:{}: no `completion` text", input.origin, i + 1))?;
        let mut conv = prompt;
        conv.push(emflow_model::Message::assistant(completion));
        out.push(conv);
    }
    Ok(out)
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

fn run_sft(ctx: &mut StageContext, p: &SftParams) -> Result<()> {
    let progress = ctx.progress_handle();
    progress.phase("loading", 0, "");
    let mut policy = load_policy(ctx, &p.lora, p.full_finetune, p.seed)?;

    // Training conversations: the data input and/or high-reward rollouts.
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
    let mut examples = Vec::with_capacity(convs.len());
    let mut truncated = 0u64;
    for c in &convs {
        let (ex, cut) = encode_example(&policy, c, p.max_length)?;
        truncated += cut as u64;
        examples.push(ex);
    }
    if truncated > 0 {
        progress.log(&format!(
            "warning: {truncated} of {} examples truncated to {} tokens",
            examples.len(),
            p.max_length
        ));
    }
    let safety = match (&p.interleave, ctx.optional_input("safety")?) {
        (Some(i), Some(input)) => {
            let cadence = i.cadence()?;
            let mut ex = Vec::new();
            for c in read_conversations(input)? {
                ex.push(encode_example(&policy, &to_model_messages(&c, None), p.max_length)?.0);
            }
            Some((cadence, i.batch_size, ex))
        }
        (None, None) => None,
        (Some(_), None) => bail!(
            "stage {}: `interleave` is set but input `safety` is not wired",
            ctx.stage_id
        ),
        (None, Some(_)) => bail!(
            "stage {}: input `safety` is wired but `interleave` is not set",
            ctx.stage_id
        ),
    };

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
    let total_steps = samples.div_ceil(per_step);

    let mut opt = AdamW::new(
        policy.vars.clone(),
        AdamWConfig {
            lr: p.lr,
            weight_decay: p.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    opt.set_weight_decay_filter(emflow_model::optim::transformers_decays);
    let schedule = LrSchedule {
        base_lr: p.lr,
        kind: p.schedule,
        warmup_steps: p.warmup_steps,
        total_steps: total_steps as usize,
    };
    let step_cfg = SftStepConfig {
        micro_batch: p.batch_size,
        kl_lambda: p.kl_lambda,
        ldifs: p.ldifs.clone(),
        max_grad_norm: p.max_grad_norm,
    };

    let ckpt_root = ctx.checkpoint_dir().join("sft");
    let resumed = resume::<SftState>(&ckpt_root, &mut policy, &mut opt)?;
    let metrics_path = ctx.output_path("metrics");
    let (mut state, mut metrics) = match &resumed {
        Some(r) => {
            progress.log(&format!(
                "resuming from checkpoint at step {}",
                r.state.main_steps + r.state.safety_steps
            ));
            (
                r.state.clone(),
                JsonlLog::open(&metrics_path, r.log("metrics").as_deref())?,
            )
        }
        None => (
            SftState {
                truncated,
                ..Default::default()
            },
            JsonlLog::open(&metrics_path, None)?,
        ),
    };
    let mut data = Cursor::new(examples.len(), p.seed, "data", state.data_consumed);
    let mut safety_cursor = safety
        .as_ref()
        .map(|(_, _, ex)| Cursor::new(ex.len(), p.seed, "safety", state.safety_consumed));

    progress.phase("training", total_steps, "steps");
    progress.inc(state.main_steps);
    while state.main_steps < total_steps {
        let started = Instant::now();
        let want = (samples - data.consumed).min(per_step) as usize;
        let batch: Vec<SftExample> = data
            .take(want)
            .into_iter()
            .map(|(i, _)| examples[i].clone())
            .collect();
        let step = state.main_steps + state.safety_steps;
        let lr = schedule.lr_at(state.main_steps as usize);
        let stats = sft_step(&mut policy, &batch, &step_cfg, &mut opt, lr)
            .with_context(|| format!("stage {}: SFT step {step}", ctx.stage_id))?;
        state.main_steps += 1;
        state.data_consumed = data.consumed;
        let secs = started.elapsed().as_secs_f64();
        metrics.append(&json!({
            "step": step, "batch": "main", "loss": stats.loss, "nll": stats.nll, "kl": stats.kl, "ldifs": stats.ldifs,
            "lr": lr, "grad_norm": stats.grad_norm, "tokens": stats.tokens, "target_tokens": stats.target_tokens,
            "samples_consumed": data.consumed, "epoch": data.epoch(),
        }))?;
        // Speed goes to the live message, never into an output: outputs must be the same bytes
        // on every run (`emflow verify`), and wall-clock figures are not.
        progress.message(&format!(
            "loss {:.4} · {:.0} tok/s",
            stats.loss,
            stats.tokens as f64 / secs.max(1e-9)
        ));
        progress.inc(1);

        if let (Some((cadence, bs, ex)), Some(cur)) = (&safety, safety_cursor.as_mut()) {
            for _ in 0..cadence.steps_after(state.main_steps) {
                let sbatch: Vec<SftExample> = cur
                    .take(*bs)
                    .into_iter()
                    .map(|(i, _)| ex[i].clone())
                    .collect();
                let s =
                    sft_step(&mut policy, &sbatch, &step_cfg, &mut opt, lr).with_context(|| {
                        format!(
                            "stage {}: safety step after main step {}",
                            ctx.stage_id, state.main_steps
                        )
                    })?;
                let step = state.main_steps + state.safety_steps;
                state.safety_steps += 1;
                state.safety_consumed = cur.consumed;
                metrics.append(&json!({
                    "step": step, "batch": "safety", "loss": s.loss, "nll": s.nll, "kl": s.kl, "ldifs": s.ldifs,
                    "lr": lr, "grad_norm": s.grad_norm, "tokens": s.tokens, "safety_consumed": cur.consumed,
                }))?;
            }
        }
        if state.main_steps % p.checkpoint_every == 0 && state.main_steps < total_steps {
            save_checkpoint(&ckpt_root, &policy, &opt, &state, &[&metrics], |_| Ok(()))?;
            ctx.check_interrupt()?;
        }
    }

    policy.save(&ctx.output_path("adapter"))?;
    let summary = json!({
        "samples_consumed": state.data_consumed,
        "steps": state.main_steps + state.safety_steps,
        "safety_steps": state.safety_steps,
        "truncated_examples": state.truncated,
    });
    super::write_summary(ctx, summary)?;
    Ok(())
}
