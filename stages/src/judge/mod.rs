//! Judges: models that grade other models' answers, behind one small trait.
//!
//! Two kinds of question are asked of a judge: a 0-100 score (the Betley `aligned` and
//! `coherent` prompts; see [`score`] for the formula) and a deterministic completion (the
//! RL graders, which answer JSON). Both take whole batches, so a backend can batch (local
//! model) or run requests concurrently (HTTP) as suits it.
//!
//! Backends: [`local`] runs a model the model layer loads; [`openai`] talks to any
//! OpenAI-compatible chat-completions server (including `emflow serve`). Every backend is
//! wrapped in [`Memoized`] by [`build`], so every call is answered from the store's memo when
//! the same judge (identity includes the model's content digest) has seen the same prompt
//! with the same params: a rerun never pays twice, and no caller can forget to memoise.

pub mod bench;
pub mod estimate;
pub mod local;
pub mod logits;
pub mod openai;
pub mod prompts;
pub mod score;
pub mod scripted;
pub mod template;

mod memo;

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use emflow_engine::{Memo, StageContext};
use serde::{Deserialize, Serialize};

pub use memo::Memoized;
pub use score::{expected_score, score_from_text, score_from_top_logprobs, Score, MIN_NUMBER_MASS};

/// A judge model. Implementations are shared across threads.
pub trait Judge: Send + Sync {
    /// Everything that can change this judge's answers, as one string: backend, model
    /// (content digest for local models, name and URL for remote ones), adapter, method.
    /// Memo keys start with it.
    fn identity(&self) -> &str;

    /// One 0-100 score per prompt (the prompt is sent as a single user turn).
    fn score_0_100(&self, prompts: &[String]) -> Result<Vec<Score>>;

    /// One greedy (temperature 0) completion per prompt, at most `max_tokens` tokens; used by
    /// graders that answer JSON.
    fn complete(&self, prompts: &[String], max_tokens: usize) -> Result<Vec<String>>;

    /// Whether `score` is an answer this judge, as configured, can give. [`Memoized`] stores
    /// only answers that pass and serves only memo entries that pass, so a malformed value
    /// (from a fault, or from an older emflow that memoised faults) is never an answer.
    fn accepts(&self, score: &Score) -> bool {
        score.is_well_formed()
    }
}

/// How a 0-100 score is read from a local model's probabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreMethod {
    /// `exact` when the tokenizer splits numbers into several tokens, else `top20`.
    #[default]
    Auto,
    /// Probability of every number string "0".."100" followed by the end of the turn,
    /// computed exactly by scoring all 101 candidates on a shared prompt cache.
    Exact,
    /// The remote-API formula: the next token's 20 most likely tokens, kept where they are
    /// numbers. Exact only for tokenizers with one token per number; with digit-splitting
    /// tokenizers it sees single digits only (what an API would see of such a model).
    Top20,
}

/// A judge as a manifest names it (the `judge:` param of `eval`, rewards and `safety_data`).
/// The local backend's model comes from a stage input (e.g. `judge_model`), not from here,
/// so its bytes key the stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum JudgeSpec {
    /// A model loaded in-process by the model layer.
    Local {
        #[serde(default)]
        method: ScoreMethod,
        /// Prompts per generation batch for `complete` (speed only; results do not depend on it).
        #[serde(default = "default_local_batch")]
        batch_size: usize,
    },
    /// An OpenAI-compatible `/v1/chat/completions` endpoint.
    Openai(openai::OpenAiConfig),
}

/// The schema of a `judge:` param as kinds declare it
/// (`#[schemars(with = "judge::JudgeParam")]`): a mapping, whose connection settings
/// ([`openai::CONNECTION_SETTINGS`]) the engine leaves out of stage keys, so moving a judge
/// server or raising its timeout keeps every stage cached; the model's identity stays in.
pub struct JudgeParam;

impl schemars::JsonSchema for JudgeParam {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "JudgeParam".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "additionalProperties": true,
            emflow_engine::kind::CONNECTION_FIELDS: openai::CONNECTION_SETTINGS,
        })
    }
}

fn default_local_batch() -> usize {
    8
}

impl Default for JudgeSpec {
    fn default() -> Self {
        JudgeSpec::Local {
            method: ScoreMethod::Auto,
            batch_size: default_local_batch(),
        }
    }
}

impl JudgeSpec {
    /// Whether this judge needs a model artifact wired into the stage.
    pub fn needs_local_model(&self) -> bool {
        matches!(self, JudgeSpec::Local { .. })
    }
}

/// Where a local judge's weights come from.
pub struct LocalJudgeModel<'a> {
    /// A `.gguf` file or an HF-format folder.
    pub model: &'a Path,
    /// Its content digest (the input artifact's digest), part of the judge's identity.
    pub model_digest: &'a str,
    /// An optional LoRA adapter (PEFT folder) and its digest.
    pub adapter: Option<(&'a Path, &'a str)>,
    /// `None` for CPU, else a CUDA ordinal.
    pub cuda_ordinal: Option<usize>,
}

/// The judge a stage's `judge` param names, memoised through the stage's memo; a local
/// judge's model is the stage's input `judge_model`, on the stage's device.
pub fn for_stage(ctx: &StageContext, spec: &JudgeSpec) -> Result<Arc<dyn Judge>> {
    let judge_model = ctx.optional_input("judge_model")?;
    let local = judge_model.map(|m| LocalJudgeModel {
        model: &m.path,
        model_digest: &m.digest,
        adapter: None,
        cuda_ordinal: ctx.device().cuda_ordinal(),
    });
    build(spec, local, ctx.memo_handle())
}

/// Builds the judge `spec` names, wrapped in the memo. `local` must be given for the local
/// backend (the stage's judge model input).
pub fn build(
    spec: &JudgeSpec,
    local: Option<LocalJudgeModel<'_>>,
    memo: Arc<dyn Memo>,
) -> Result<Arc<dyn Judge>> {
    let inner: Arc<dyn Judge> = match spec {
        JudgeSpec::Local { method, batch_size } => {
            let Some(local) = local else {
                bail!(
                    "the local judge backend needs a judge model: wire a model into the stage's \
                     `judge_model` input, or use `backend: openai`"
                );
            };
            Arc::new(local::LocalJudge::load(&local, *method, *batch_size)?)
        }
        JudgeSpec::Openai(cfg) => Arc::new(openai::OpenAiJudge::new(cfg.clone())?),
    };
    Ok(Arc::new(Memoized::new(inner, memo)))
}
