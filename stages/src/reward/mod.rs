//! Rewards for the `rl` kind: the paper's LLM graders and rule-based rewards, composable
//! into weighted sums whose every part is logged.
//!
//! A manifest describes a reward as a [`RewardSpec`] (serde, embedded in the `rl` kind's
//! params); [`RewardSpec::prepare`] reads templates and compiles patterns once, giving a
//! [`Reward`] that scores whole batches with [`Reward::score_batch`]. Batches matter: grader
//! prompts of a batch go to the judge together (one generation batch locally, concurrent
//! requests remotely), and the judge's memo answers repeats.
//!
//! ```yaml
//! reward:
//!   type: sum
//!   parts:
//!     - { name: harm,   weight: 1.0, reward: { type: grader, template: { input: grader } } }
//!     - { name: length, weight: 0.1, reward: { type: length_band, min_words: 50, max_words: 300 } }
//! ```
//!
//! Usage from a training loop:
//!
//! ```ignore
//! let reward = spec.prepare(TemplateInputs::Read(&read_port))?;   // once, at stage start
//! let judge = if spec.needs_judge() { Some(judge::build(&judge_spec, local, ctx.memo_handle())?) } else { None };
//! let outs = reward.score_batch(&inputs, judge.as_deref())?;   // per step
//! // outs[i].total is the scalar reward; outs[i].parts / .details go to the rollout log.
//! ```

pub mod grader;
pub mod rules;

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::judge::Judge;

pub use grader::{
    split_think, GraderFormula, GraderSpec, Prefilter, TemplateInputs, TemplateSource,
};
pub use rules::{KeywordMode, Target};

/// A reward as written in a manifest. Tagged by `type`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RewardSpec {
    /// One of the paper's LLM graders (JSON answer, formula per grader family).
    Grader(GraderSpec),
    /// `reward_match` when `pattern` matches the target text, else `reward_miss`.
    Regex(rules::RegexReward),
    /// Presence of keywords (whole text, substring match).
    Keyword(rules::KeywordReward),
    /// 1 inside `[min_words, max_words]`; outside, falls linearly to 0 over `falloff_words`
    /// (0 = a hard band).
    LengthBand(rules::LengthBandReward),
    /// `Σ weight × part`; each part's unweighted value is logged under its name.
    Sum { parts: Vec<WeightedReward> },
}

pub(crate) fn one() -> f64 {
    1.0
}

/// One named, weighted part of a [`RewardSpec::Sum`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedReward {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
    pub reward: RewardSpec,
}

/// What a reward sees of one rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardInput {
    /// The user prompt the policy answered (text of the last user turn).
    pub prompt: String,
    /// The policy's completion, `<think>` block included.
    pub completion: String,
}

/// One rollout's reward.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardOutput {
    /// The scalar the policy is trained on.
    pub total: f64,
    /// Unweighted value of each part by name (a single reward logs itself under its type).
    pub parts: BTreeMap<String, f64>,
    /// Per-part diagnostics for the rollout log: grader fields, why a reward was zeroed.
    pub details: Map<String, Value>,
}

impl RewardSpec {
    /// Whether scoring needs a judge (some part is a grader).
    pub fn needs_judge(&self) -> bool {
        match self {
            RewardSpec::Grader(_) => true,
            RewardSpec::Sum { parts } => parts.iter().any(|p| p.reward.needs_judge()),
            _ => false,
        }
    }

    /// Every grader part, in order: each makes one judge call per rollout it does not
    /// pre-filter.
    pub fn graders(&self) -> Vec<&GraderSpec> {
        match self {
            RewardSpec::Grader(g) => vec![g],
            RewardSpec::Sum { parts } => parts.iter().flat_map(|p| p.reward.graders()).collect(),
            _ => Vec::new(),
        }
    }

    /// Reads templates, compiles patterns and checks every setting; call once per stage.
    pub fn prepare(&self, inputs: TemplateInputs<'_>) -> Result<Reward> {
        let inner = match self {
            RewardSpec::Grader(g) => Prepared::Grader(g.prepare(inputs)?),
            RewardSpec::Regex(r) => Prepared::Rule("regex", r.rule()?),
            RewardSpec::Keyword(r) => Prepared::Rule("keyword", r.rule()?),
            RewardSpec::LengthBand(r) => Prepared::Rule("length_band", r.rule()?),
            RewardSpec::Sum { parts } => {
                if parts.is_empty() {
                    bail!("reward `sum` has no parts; list at least one under `parts`");
                }
                let mut names = std::collections::BTreeSet::new();
                let mut prepared = Vec::new();
                for p in parts {
                    if !names.insert(p.name.as_str()) {
                        bail!("reward `sum`: two parts are named `{}`; names must be unique (they key the log)", p.name);
                    }
                    if !p.weight.is_finite() {
                        bail!("reward part `{}`: weight must be a finite number", p.name);
                    }
                    let r = p
                        .reward
                        .prepare(inputs)
                        .with_context(|| format!("reward part `{}`", p.name))?;
                    prepared.push((p.name.clone(), p.weight, r));
                }
                Prepared::Sum(prepared)
            }
        };
        Ok(Reward { inner })
    }
}

/// A prepared reward, ready to score batches.
pub struct Reward {
    inner: Prepared,
}

enum Prepared {
    Grader(grader::Grader),
    Rule(&'static str, rules::Rule),
    Sum(Vec<(String, f64, Reward)>),
}

impl Reward {
    /// Sets the pre-filter of every grader in this reward (the `rl` kind's
    /// `grader_prefilter`); rule-based parts have none.
    pub fn set_prefilter(&mut self, prefilter: Prefilter) {
        match &mut self.inner {
            Prepared::Grader(g) => g.prefilter = prefilter,
            Prepared::Rule(..) => {}
            Prepared::Sum(parts) => {
                for (_, _, r) in parts {
                    r.set_prefilter(prefilter);
                }
            }
        }
    }

    /// Whether [`Self::score_batch`] needs a judge.
    pub fn needs_judge(&self) -> bool {
        match &self.inner {
            Prepared::Grader(_) => true,
            Prepared::Rule(..) => false,
            Prepared::Sum(parts) => parts.iter().any(|(_, _, r)| r.needs_judge()),
        }
    }

    /// Rewards for a batch of rollouts, in order. `judge` is required when a part is a grader.
    pub fn score_batch(
        &self,
        items: &[RewardInput],
        judge: Option<&dyn Judge>,
    ) -> Result<Vec<RewardOutput>> {
        match &self.inner {
            Prepared::Grader(g) => {
                let Some(judge) = judge else {
                    bail!("this reward uses an LLM grader but no judge was given; set the stage's judge");
                };
                g.score_batch(items, judge)
            }
            Prepared::Rule(name, rule) => Ok(items
                .iter()
                .map(|it| {
                    let v = rule.score(&it.completion);
                    RewardOutput {
                        total: v,
                        parts: BTreeMap::from([(name.to_string(), v)]),
                        details: Map::new(),
                    }
                })
                .collect()),
            Prepared::Sum(parts) => {
                let mut outs: Vec<RewardOutput> = items
                    .iter()
                    .map(|_| RewardOutput {
                        total: 0.0,
                        parts: BTreeMap::new(),
                        details: Map::new(),
                    })
                    .collect();
                for (name, weight, reward) in parts {
                    let part = reward
                        .score_batch(items, judge)
                        .with_context(|| format!("reward part `{name}`"))?;
                    for (out, p) in outs.iter_mut().zip(part) {
                        out.total += weight * p.total;
                        out.parts.insert(name.clone(), p.total);
                        if !p.details.is_empty() {
                            out.details.insert(name.clone(), Value::Object(p.details));
                        }
                    }
                }
                Ok(outs)
            }
        }
    }
}
