//! Safety SFT steps interleaved with a training kind's main steps (param `interleave` with
//! input `safety`): the safety examples, encoded once; when to step ([`Cadence`]); and a
//! seeded walk over the examples whose position the checkpoint holds. `sft` and `rl` both
//! interleave through [`Interleave`], so one setting means the same batches in either. With
//! `rl`'s `safety_source: current_policy` the examples start empty and are replaced by each
//! regeneration ([`Interleave::replace_examples`], [`super::regenerate`]).

use std::collections::BTreeSet;

use anyhow::{bail, ensure, Context as _, Result};
use emflow_engine::context::StageContext;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::batch::SftExample;
use super::policy::Policy;
use super::resume::Cursor;
use super::schedule::Cadence;
use crate::formats::messages::{read_conversations, to_model_messages, Conversation};
use crate::kinds::defaults;

/// The data stream name of the safety examples' order (part of their seed).
const STREAM: &str = "safety";

/// The field of a safety conversation that says who wrote its answer: `safety_data` writes
/// [`REFERENCE_MODEL`] (or [`MODEL_WITH_ADAPTER`]); a conversation without it is a fixed
/// target ([`FIXED`]). The safety steps' metrics lines carry what the input's rows say
/// ([`Interleave::source`]), so the report tells the arms apart from the data's bytes, not
/// from stage names.
pub const ANSWER_SOURCE: &str = "answer_source";
/// A conversation with no [`ANSWER_SOURCE`]: an answer written before training.
pub const FIXED: &str = "fixed";
/// The reference model's own answers, sampled once before training (`safety_data`).
pub const REFERENCE_MODEL: &str = "reference_model";
/// Answers of the model with an adapter, sampled once (`safety_data` with input `adapter`).
pub const MODEL_WITH_ADAPTER: &str = "model_with_adapter";
/// Answers regenerated from the policy being trained (`rl`'s `safety_source: current_policy`).
pub const CURRENT_POLICY: &str = "current_policy";

/// Interleaved safety batches: `every: k` main steps, or a `share` of all steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InterleaveParams {
    /// Main steps per safety step.
    pub every: Option<u64>,
    /// Share of all steps that are safety steps (0..1).
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

/// The interleave setting as [`Interleave::load`] takes it: (cadence, examples per step).
pub fn interleave_setting(i: Option<&InterleaveParams>) -> Result<Option<(Cadence, usize)>> {
    i.map(|i| Ok((i.cadence()?, i.batch_size))).transpose()
}

pub struct Interleave {
    cadence: Cadence,
    batch_size: usize,
    examples: Vec<SftExample>,
    seed: u64,
    cursor: Cursor,
    /// Who wrote the answers: one of the [`ANSWER_SOURCE`] values, or several joined by `+`.
    source: String,
}

impl Interleave {
    /// The stage's safety batches: `setting` is its `interleave` param as (cadence, examples
    /// per safety step); input `safety` must be wired exactly when it is set. Examples are cut
    /// to `max_length` tokens if given; the walk starts at the beginning ([`Self::seek`]).
    pub fn load(
        ctx: &StageContext,
        setting: Option<(Cadence, usize)>,
        policy: &Policy,
        max_length: Option<usize>,
        seed: u64,
    ) -> Result<Option<Self>> {
        let (cadence, batch_size, input) = match (setting, ctx.optional_input("safety")?) {
            (Some((cadence, batch_size)), Some(input)) => (cadence, batch_size, input),
            (None, None) => return Ok(None),
            (Some(_), None) => bail!(
                "stage {}: `interleave` is set but input `safety` is not wired",
                ctx.stage_id
            ),
            (None, Some(_)) => bail!(
                "stage {}: input `safety` is wired but `interleave` is not set",
                ctx.stage_id
            ),
        };
        let mut examples = Vec::new();
        let mut sources = BTreeSet::new();
        for (i, c) in read_conversations(input)?.iter().enumerate() {
            sources.insert(
                answer_source(c).with_context(|| format!("{}: row {}", input.origin, i + 1))?,
            );
            let conv = to_model_messages(c, None);
            examples.push(SftExample::encode(&policy.lm, &conv, max_length)?.0);
        }
        Ok(Some(Interleave {
            cadence,
            batch_size,
            cursor: Cursor::new(examples.len(), seed, STREAM, 0),
            examples,
            seed,
            source: sources.into_iter().collect::<Vec<_>>().join("+"),
        }))
    }

    /// Safety batches with no examples yet, for examples regenerated during the run
    /// ([`Self::replace_examples`]).
    pub fn empty((cadence, batch_size): (Cadence, usize), seed: u64) -> Self {
        Interleave {
            cadence,
            batch_size,
            examples: Vec::new(),
            seed,
            cursor: Cursor::new(0, seed, STREAM, 0),
            source: CURRENT_POLICY.into(),
        }
    }

    /// Who wrote the safety answers ([`ANSWER_SOURCE`]): what the input's rows say, several
    /// joined by `+` in sorted order; [`CURRENT_POLICY`] for regenerated examples.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Replaces the examples by a new set and starts its walk at the beginning.
    pub fn replace_examples(&mut self, examples: Vec<SftExample>) {
        self.examples = examples;
        self.seek(0);
    }

    /// Whether there is no example to take a batch from.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Puts the walk where a run that consumed `consumed` safety examples left it.
    pub fn seek(&mut self, consumed: u64) {
        self.cursor = Cursor::new(self.examples.len(), self.seed, STREAM, consumed);
    }

    /// Safety steps due right after main step number `main_steps` (1-based).
    pub fn steps_after(&self, main_steps: u64) -> u64 {
        self.cadence.steps_after(main_steps)
    }

    /// Examples per safety step.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The next safety batch (there must be examples: [`Self::is_empty`]).
    pub fn next_batch(&mut self) -> Vec<SftExample> {
        self.cursor
            .take(self.batch_size)
            .into_iter()
            .map(|(i, _)| self.examples[i].clone())
            .collect()
    }

    /// Safety examples consumed so far (the checkpointed position).
    pub fn consumed(&self) -> u64 {
        self.cursor.consumed
    }
}

/// Conversation `c`'s [`ANSWER_SOURCE`], [`FIXED`] when it has none.
fn answer_source(c: &Conversation) -> Result<String> {
    match c.extra.get(ANSWER_SOURCE) {
        None => Ok(FIXED.into()),
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(v) => bail!("`{ANSWER_SOURCE}` is {v}, not a non-empty string"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_row_without_an_answer_source_is_a_fixed_target() {
        let conv = |extra: serde_json::Value| {
            let mut row = json!({"messages": [{"role": "user", "content": "q"}]});
            row.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            Conversation::from_object(row.as_object().unwrap().clone()).unwrap()
        };
        assert_eq!(answer_source(&conv(json!({}))).unwrap(), FIXED);
        let tagged = conv(json!({ANSWER_SOURCE: REFERENCE_MODEL}));
        assert_eq!(answer_source(&tagged).unwrap(), REFERENCE_MODEL);
        let bad = answer_source(&conv(json!({ANSWER_SOURCE: 3}))).unwrap_err();
        assert!(bad.to_string().contains("not a non-empty string"), "{bad}");
    }
}
