//! `persona_vector`: a persona direction in a model's residual stream, after Chen et al. 2025
//! ("Persona Vectors"): the mean hidden state at one decoder layer's output while the model
//! speaks under a trait-eliciting system prompt ("positive", e.g. evil) minus the mean under
//! the opposite prompt ("negative", e.g. helpful), over the same neutral questions. `rl` and
//! `sft` add `alpha` times it in training passes (preventive steering; docs/persona-steering.md).
//!
//! Each (persona prompt, question) pair is a conversation `[system, user]`. With
//! `pool: response` (Chen et al.) the model answers it (`samples_per_question` answers,
//! seeded per side, prompt, question and sample, so nothing depends on batch sizes) and the
//! layer's outputs are averaged over the answer's tokens (its final EOS left out); with
//! `pool: prompt` nothing is sampled and the average is over the prompt's tokens (cheap, but
//! dominated by the system prompts' own words). Each conversation's average counts once; the
//! vector is the difference of the two sides' means. The hidden states come from an
//! eval-mode pass of the whole sequence (no cache, no graph).
//!
//! Unlike Chen et al. no judge filters the answers (they keep positive answers a judge
//! scores as showing the trait, and negative ones not): every answer counts, and
//! `samples` logs them all.

use anyhow::{bail, ensure, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use emflow_engine::{Kind, KindInfo, StageContext};
use emflow_model::{
    derive_seed, encode_prompt, Finish, Generation, GenerationRequest, LoadedModel, Message,
    SamplingParams,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::defaults;
use crate::sampling::{sample_answers, Temperature, TopP};
use crate::train::setup::load_stage_model;
use crate::train::steering::{VECTOR_FILE, VECTOR_INFO, VECTOR_TENSOR};

pub struct PersonaVectorKind;

/// Which token positions a conversation's hidden states are averaged over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// The answer the model samples under the persona (Chen et al.).
    #[default]
    Response,
    /// The persona prompt itself (system and user turns): no sampling.
    Prompt,
}

/// The `persona_vector` kind's params: the one declaration of their names, types, defaults,
/// ranges and docs (the engine derives the kind's spec from this struct).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PersonaVectorParams {
    /// decoder layer whose output is averaged (0-based; transformers' hidden_states[layer + 1]); null = num_layers / 2 - 1, the output Chen et al. call layer num_layers / 2 (their Llama-3.1-8B choice, 16 of 32)
    layer: Option<usize>,
    /// positions averaged: `response` (answers sampled under each persona, as Chen et al.) or `prompt` (the persona prompt's tokens; nothing is sampled)
    #[serde(default)]
    pool: Pool,
    /// answers per (persona prompt, question) with pool response
    #[serde(default = "defaults::int::<1>")]
    #[schemars(range(min = 1))]
    samples_per_question: usize,
    /// tokens per answer
    #[serde(default = "defaults::int::<256>")]
    #[schemars(range(min = 1))]
    max_tokens: usize,
    #[serde(default)]
    temperature: Temperature,
    #[serde(default)]
    top_p: TopP,
    /// use the first N questions of the persona file (null = all)
    #[schemars(range(min = 1))]
    questions: Option<usize>,
    /// use the first N system prompts of each side (null = all)
    #[schemars(range(min = 1))]
    prompts_per_side: Option<usize>,
    /// sampling seed
    #[serde(default)]
    seed: u64,
    /// generation batch (speed only; results do not depend on it)
    #[serde(default = "defaults::int::<16>")]
    #[schemars(range(min = 1))]
    batch_size: usize,
    /// extra names for the model's chat template, as transformers' apply_chat_template(**kwargs): e.g. {enable_thinking: false} for Qwen3
    #[serde(default)]
    chat_template_kwargs: emflow_model::TemplateKwargs,
}

/// The persona file (input `personas`): two sides' system prompts and the questions asked
/// under each.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersonaFile {
    /// The trait's name (e.g. `evil`), recorded with the vector.
    #[serde(rename = "trait")]
    trait_name: String,
    #[serde(default)]
    #[allow(dead_code)] // For the reader of the file; the vector does not depend on it.
    description: String,
    /// System prompts that elicit the trait.
    positive: Vec<String>,
    /// System prompts that elicit its opposite.
    negative: Vec<String>,
    /// Neutral user questions, asked under every system prompt.
    questions: Vec<String>,
}

/// One conversation whose hidden states are averaged: a side, a system prompt, a question.
struct Row {
    positive: bool,
    prompt_index: usize,
    question_index: usize,
    sample: usize,
    messages: Vec<Message>,
    prompt_ids: Vec<u32>,
}

/// Each side's summed per-conversation means, and how many conversations were summed.
#[derive(Default)]
struct SideSums {
    sum: Option<Tensor>,
    count: usize,
}

impl Kind for PersonaVectorKind {
    type Params = PersonaVectorParams;

    /// `batch_size` answers sampled at once.
    fn memory_demand(
        &self,
        p: &PersonaVectorParams,
    ) -> Option<emflow_engine::memory::MemoryDemand> {
        super::memory::sampling(p.batch_size, p.max_tokens)
    }

    fn run(&self, ctx: &mut StageContext, p: &PersonaVectorParams) -> Result<()> {
        run_persona_vector(ctx, p).with_context(|| format!("stage {}", ctx.stage_id))
    }

    fn describe(&self) -> KindInfo {
        KindInfo::new("persona_vector", 1, "A persona direction (Chen et al.): mean hidden state at one layer under trait prompts minus under opposite prompts, for preventive steering in rl/sft")
            .ports(
                "in   model     model    the model whose residual stream is read (the policy's base)
                 in?  adapter   adapter  a LoRA adapter (PEFT folder) or full fine-tuned weights for `model`
                 in   personas  file     JSON: {trait, positive: [system prompts], negative: [system prompts], questions: [user turns]}
                 out  vector    dir      persona_vector.safetensors (tensor `persona_vector`, (hidden,), f32) and persona_vector.json (layer, norm, counts)
                 out  samples   samples  every conversation averaged: side, prompts, answer, tokens pooled, JSONL",
            )
    }
}

fn run_persona_vector(ctx: &mut StageContext, p: &PersonaVectorParams) -> Result<()> {
    let personas = read_personas(ctx, p)?;
    let mut lm = load_stage_model(ctx)?;
    lm.chat.set_kwargs(p.chat_template_kwargs.clone())?;
    let layers = lm.config.num_layers;
    let layer = p.layer.unwrap_or((layers / 2).saturating_sub(1));
    ensure!(
        layer < layers,
        "`layer` {layer} does not exist: the model has {layers} decoder layers (0..{})",
        layers - 1
    );
    let rows = conversations(&lm, p, &personas)?;
    let answers = match p.pool {
        Pool::Response => Some(answer(&lm, p, &rows, ctx)?),
        Pool::Prompt => None,
    };
    ctx.progress()
        .phase("hidden states", rows.len() as u64, "conversations");
    let (mut sides, mut log, mut empty) = ([SideSums::default(), SideSums::default()], vec![], 0);
    for (i, row) in rows.iter().enumerate() {
        let generation = answers.as_ref().map(|a| &a[i]);
        let (ids, span) = pooled_span(row, generation);
        log.push(sample_line(row, generation, span));
        if span.1 == 0 {
            empty += 1;
        } else {
            let mean = span_mean(&lm, &ids, layer, span)?;
            sides[usize::from(!row.positive)].add(mean)?;
        }
        ctx.progress().inc(1);
    }
    crate::formats::jsonl::write(&ctx.output_path("samples"), &log)?;
    let [positive, negative] = sides;
    let info = Info {
        trait_name: &personas.trait_name,
        layer,
        pool: p.pool,
        empty,
    };
    write_vector(ctx, &positive, &negative, &info)
}

/// The persona file, cut to `prompts_per_side` and `questions`, checked non-empty.
fn read_personas(ctx: &StageContext, p: &PersonaVectorParams) -> Result<PersonaFile> {
    let input = ctx.input("personas")?;
    let text = std::fs::read_to_string(&input.path)
        .with_context(|| format!("reading {}", input.origin))?;
    let mut f: PersonaFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a persona file ({{trait, positive, negative, questions}}; see manifests/data/persona)",
            input.origin
        )
    })?;
    for (name, list, take) in [
        ("positive", &mut f.positive, p.prompts_per_side),
        ("negative", &mut f.negative, p.prompts_per_side),
        ("questions", &mut f.questions, p.questions),
    ] {
        ensure!(
            list.iter().all(|s| !s.trim().is_empty()),
            "{}: `{name}` has an empty entry",
            input.origin
        );
        if let Some(n) = take {
            ensure!(
                n <= list.len(),
                "{}: {n} of `{name}` asked for, but the file has {}",
                input.origin,
                list.len()
            );
            list.truncate(n);
        }
        ensure!(!list.is_empty(), "{}: `{name}` is empty", input.origin);
    }
    Ok(f)
}

/// Every (side, system prompt, question, sample) conversation, encoded as a generation
/// prompt. With `pool: prompt` one sample each (nothing is sampled).
fn conversations(lm: &LoadedModel, p: &PersonaVectorParams, f: &PersonaFile) -> Result<Vec<Row>> {
    let samples = match p.pool {
        Pool::Response => p.samples_per_question,
        Pool::Prompt => 1,
    };
    let mut rows = Vec::new();
    for (positive, prompts) in [(true, &f.positive), (false, &f.negative)] {
        for (prompt_index, system) in prompts.iter().enumerate() {
            for (question_index, question) in f.questions.iter().enumerate() {
                let messages = vec![Message::system(system.clone()), Message::user(question)];
                let prompt_ids = encode_prompt(&lm.tokenizer, &lm.chat, &messages)
                    .with_context(|| format!("encoding question {question_index}"))?;
                for sample in 0..samples {
                    rows.push(Row {
                        positive,
                        prompt_index,
                        question_index,
                        sample,
                        messages: messages.clone(),
                        prompt_ids: prompt_ids.clone(),
                    });
                }
            }
        }
    }
    Ok(rows)
}

/// The model's answer to every row, seeded by (side, prompt, question) and sample index.
fn answer(
    lm: &LoadedModel,
    p: &PersonaVectorParams,
    rows: &[Row],
    ctx: &StageContext,
) -> Result<Vec<Generation>> {
    let requests: Vec<GenerationRequest> = rows
        .iter()
        .map(|r| GenerationRequest {
            prompt_ids: r.prompt_ids.clone(),
            seed: derive_seed(p.seed, &r.key(), r.sample as u64),
        })
        .collect();
    let sampling = SamplingParams {
        temperature: p.temperature.0,
        top_p: p.top_p.0,
        ..SamplingParams::greedy(p.max_tokens)
    };
    sample_answers(lm, &requests, &sampling, p.batch_size, ctx.progress())
}

impl Row {
    /// The row's sampling key: side, system prompt and question.
    fn key(&self) -> String {
        let side = if self.positive {
            "positive"
        } else {
            "negative"
        };
        format!("{side}/{}/{}", self.prompt_index, self.question_index)
    }
}

/// The sequence to run and the (start, length) of the positions averaged: the prompt's, or
/// the answer's after it without a final EOS (length 0 when the answer is empty).
fn pooled_span(row: &Row, generation: Option<&Generation>) -> (Vec<u32>, (usize, usize)) {
    let Some(g) = generation else {
        return (row.prompt_ids.clone(), (0, row.prompt_ids.len()));
    };
    let mut answer = g.tokens.as_slice();
    if matches!(g.finish, Finish::Eos) {
        answer = &answer[..answer.len().saturating_sub(1)];
    }
    let ids = [row.prompt_ids.as_slice(), answer].concat();
    (ids, (row.prompt_ids.len(), answer.len()))
}

/// The mean over `span` positions of decoder `layer`'s output for `ids`, (hidden,) f32 on
/// the CPU.
fn span_mean(lm: &LoadedModel, ids: &[u32], layer: usize, span: (usize, usize)) -> Result<Tensor> {
    let device = lm.model.device();
    let t = ids.len();
    let ids_t = Tensor::from_vec(ids.to_vec(), (1, t), device)?;
    let mask = Tensor::ones((1, t), DType::F32, device)?;
    let hidden = lm.model.forward_eval_hidden(&ids_t, &mask, &[layer])?;
    let h = hidden
        .into_iter()
        .next()
        .context("internal: no hidden state for the requested layer")?;
    let mean = h
        .squeeze(0)?
        .narrow(0, span.0, span.1)?
        .to_dtype(DType::F32)?
        .mean(0)?;
    Ok(mean.to_device(&Device::Cpu)?)
}

/// The `samples` line of one conversation.
fn sample_line(row: &Row, g: Option<&Generation>, span: (usize, usize)) -> serde_json::Value {
    json!({
        "side": if row.positive { "positive" } else { "negative" },
        "prompt_index": row.prompt_index, "question_index": row.question_index, "sample": row.sample,
        "messages": row.messages, "answer": g.map(|g| g.text.clone()),
        "finish": g.map(|g| format!("{:?}", g.finish).to_lowercase()), "pooled_tokens": span.1,
    })
}

impl SideSums {
    fn add(&mut self, mean: Tensor) -> Result<()> {
        self.sum = Some(match self.sum.take() {
            None => mean,
            Some(s) => (s + mean)?,
        });
        self.count += 1;
        Ok(())
    }

    /// The side's mean, or an error naming the side when it averaged nothing.
    fn mean(&self, side: &str) -> Result<Tensor> {
        match &self.sum {
            Some(s) if self.count > 0 => Ok((s / self.count as f64)?),
            _ => bail!(
                "every {side} answer was empty, so the {side} mean is undefined; sample longer \
                 answers (max_tokens), more of them, or use `pool: prompt`"
            ),
        }
    }
}

/// What `persona_vector.json` records besides the norms and counts.
struct Info<'a> {
    trait_name: &'a str,
    layer: usize,
    pool: Pool,
    /// Conversations left out because their answer was empty.
    empty: usize,
}

/// Writes the vector (positive mean - negative mean) and its JSON; puts the figures in the
/// stage's record.
fn write_vector(
    ctx: &mut StageContext,
    positive: &SideSums,
    negative: &SideSums,
    info: &Info,
) -> Result<()> {
    let (pos, neg) = (positive.mean("positive")?, negative.mean("negative")?);
    let vector = (&pos - &neg)?;
    let norm = |t: &Tensor| -> Result<f64> {
        Ok(t.sqr()?
            .sum_all()?
            .sqrt()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    };
    let dir = ctx.output_path("vector");
    std::fs::create_dir_all(&dir).context("creating the vector folder")?;
    let tensors = std::collections::HashMap::from([(VECTOR_TENSOR.to_string(), vector.clone())]);
    candle_core::safetensors::save(&tensors, dir.join(VECTOR_FILE))
        .context("writing the persona vector")?;
    let figures = json!({
        "trait": info.trait_name, "layer": info.layer, "pool": info.pool, "hidden_size": vector.dim(0)?,
        "norm": norm(&vector)?, "positive_mean_norm": norm(&pos)?, "negative_mean_norm": norm(&neg)?,
        "counts": { "positive": positive.count, "negative": negative.count, "empty_answers": info.empty },
    });
    std::fs::write(dir.join(VECTOR_INFO), serde_json::to_vec_pretty(&figures)?)?;
    for key in ["layer", "norm"] {
        ctx.summarize(key, figures[key].clone());
    }
    ctx.summarize("conversations", positive.count + negative.count);
    ctx.summarize("empty_answers", info.empty);
    Ok(())
}
