//! The `local` judge backend: a model the model layer loads, run in-process.
//!
//! 0-100 scores come from the model's probabilities, not its sampled answer. The paper's
//! formula reads one token's top-20 log-probabilities, which presumes one token per number;
//! SmolLM2 and Llama tokenizers split "85" into "8", "5", so for them ([`ScoreMethod::Exact`])
//! every number string "0".."100" followed by an end-of-turn token is scored as a whole
//! candidate continuation on one shared prompt cache, giving `p_k` exactly. `Top20` is kept for
//! one-token-per-number tokenizers and to match what an API client sees of this model.

use std::sync::Mutex;

use anyhow::{Context as _, Result};
use emflow_model::{
    encode_prompt, GenerationRequest, LoadedModel, Message, SamplingParams, Transformer,
};

use super::logits::{next_token_logprobs, token_text, top_k};
use super::score::{expected_score, score_from_top_logprobs, Score, MAX_SCORE};
use super::{Judge, LocalJudgeModel, ScoreMethod};
use crate::train::setup::load_model;

/// How many tokens the top-k formula reads (the OpenAI API maximum).
pub const TOP_LOGPROBS: usize = 20;

pub struct LocalJudge {
    // Calls are serialised: one forward pass already uses every core, and the model's
    // generation state is per call, so parallel calls would only contend.
    lm: Mutex<LoadedModel>,
    identity: String,
    method: ScoreMethod,
    numbers: Vec<(u32, Vec<u32>)>,
    end_ids: Vec<u32>,
    batch_size: usize,
}

impl LocalJudge {
    /// Loads the model (and adapter) named by `src` on its device.
    pub fn load(src: &LocalJudgeModel<'_>, method: ScoreMethod, batch_size: usize) -> Result<Self> {
        let setup = emflow_model::setup(src.cuda_ordinal)?;
        let lm = load_model(src.model, src.adapter.map(|(dir, _)| dir), &setup)
            .context("loading the judge")?;
        let mut identity = format!("local|{}", src.model_digest);
        if let Some((_, digest)) = src.adapter {
            identity.push_str(&format!("|adapter={digest}"));
        }
        Self::from_loaded(lm, identity, method, batch_size)
    }

    /// Wraps an already loaded model; `identity` must change whenever its weights do.
    pub fn from_loaded(
        lm: LoadedModel,
        identity: String,
        method: ScoreMethod,
        batch_size: usize,
    ) -> Result<Self> {
        let numbers = (0..=MAX_SCORE)
            .map(|k| Ok((k, lm.tokenizer.encode(&k.to_string())?)))
            .collect::<Result<Vec<_>>>()
            .context("tokenising the numbers 0..100 for the judge")?;
        let single_tokens = numbers.iter().all(|(_, ids)| ids.len() == 1);
        let method = match method {
            ScoreMethod::Auto if single_tokens => ScoreMethod::Top20,
            ScoreMethod::Auto => ScoreMethod::Exact,
            m => m,
        };
        let end_ids = lm.tokenizer.eos_ids().to_vec();
        anyhow::ensure!(
            !end_ids.is_empty() || method != ScoreMethod::Exact,
            "the judge's tokenizer declares no end-of-turn token, so exact number scoring cannot tell \
             \"8\" from \"85\"; use `method: top20`"
        );
        let identity = format!("{identity}|{}", method_name(method));
        Ok(LocalJudge {
            lm: Mutex::new(lm),
            identity,
            method,
            numbers,
            end_ids,
            batch_size: batch_size.max(1),
        })
    }

    /// The method in use after resolving `auto`.
    pub fn method(&self) -> ScoreMethod {
        self.method
    }

    fn prompt_ids(lm: &LoadedModel, prompt: &str) -> Result<Vec<u32>> {
        encode_prompt(
            &lm.tokenizer,
            &lm.chat,
            &[Message {
                role: "user".into(),
                content: prompt.into(),
            }],
        )
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, LoadedModel>> {
        self.lm
            .lock()
            .map_err(|_| anyhow::anyhow!("judge model lock poisoned by an earlier panic"))
    }
}

fn method_name(m: ScoreMethod) -> &'static str {
    match m {
        ScoreMethod::Auto => "auto",
        ScoreMethod::Exact => "exact",
        ScoreMethod::Top20 => "top20",
    }
}

/// `p_k` for each number: the probability that the continuation of `prompt` is exactly the
/// number's tokens followed by one of `end_ids`, from one batched candidate scoring pass.
pub fn number_probabilities(
    model: &Transformer,
    prompt: &[u32],
    numbers: &[(u32, Vec<u32>)],
    end_ids: &[u32],
) -> Result<Vec<(u32, f64)>> {
    let mut candidates = Vec::with_capacity(numbers.len() * end_ids.len());
    for (_, ids) in numbers {
        for &end in end_ids {
            let mut c = ids.clone();
            c.push(end);
            candidates.push(c);
        }
    }
    let logprobs = model.score_candidates(prompt, &candidates)?;
    anyhow::ensure!(
        logprobs.len() == candidates.len(),
        "score_candidates returned the wrong number of scores"
    );
    Ok(numbers
        .iter()
        .enumerate()
        .map(|(i, (k, _))| {
            let p: f64 = logprobs[i * end_ids.len()..(i + 1) * end_ids.len()]
                .iter()
                .map(|lp| lp.exp())
                .sum();
            (*k, p)
        })
        .collect())
}

impl Judge for LocalJudge {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn score_0_100(&self, prompts: &[String]) -> Result<Vec<Score>> {
        let lm = self.lock()?;
        prompts
            .iter()
            .map(|p| {
                let ids = Self::prompt_ids(&lm, p)?;
                match self.method {
                    ScoreMethod::Top20 => {
                        let lps = next_token_logprobs(&lm.model, &ids)?;
                        let top = top_k(&lps, TOP_LOGPROBS)
                            .into_iter()
                            .map(|(id, lp)| Ok((token_text(&lm.tokenizer, id)?, lp as f64)))
                            .collect::<Result<Vec<_>>>()?;
                        Ok(score_from_top_logprobs(&top))
                    }
                    _ => Ok(expected_score(&number_probabilities(
                        &lm.model,
                        &ids,
                        &self.numbers,
                        &self.end_ids,
                    )?)),
                }
            })
            .collect()
    }

    fn complete(&self, prompts: &[String], max_tokens: usize) -> Result<Vec<String>> {
        let lm = self.lock()?;
        let reqs = prompts
            .iter()
            .map(|p| {
                Ok(GenerationRequest {
                    prompt_ids: Self::prompt_ids(&lm, p)?,
                    seed: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let params = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_new_tokens: max_tokens,
            stop: Vec::new(),
        };
        let gens = lm.model.generate_sharing_prefix(
            &lm.tokenizer,
            &reqs,
            &params,
            self.batch_size,
            &|_| {},
        )?;
        Ok(gens.into_iter().map(|g| g.text).collect())
    }
}
