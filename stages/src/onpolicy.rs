//! On-policy safety answers: a model answers safety prompts, a judge scores every answer on
//! a safety criterion and on coherence, and the answers that pass both become conversations
//! for interleaved SFT. One piece of code for both places that collect them:
//! - the `safety_data` kind, before training, from the reference policy (the model with no
//!   adapter, or a given one), judged with the Betley `aligned` prompt;
//! - `rl`'s in-loop regeneration ([`crate::train::regenerate`], `safety_source:
//!   current_policy`), every K steps from the policy being trained, judged with a safe/refusal
//!   grader template the manifest wires in.
//!
//! Sampling is seeded per (prompt, sample) through a caller's `derive_seed` rule, so what is
//! kept does not depend on batch sizes; judge calls go through the stage's memo
//! ([`crate::judge::for_stage`]). Every answer's scores and verdict become one judgment line,
//! so a threshold can be re-chosen by reading the log rather than re-running.

use std::collections::BTreeMap;

use anyhow::{ensure, Context as _, Result};
use emflow_engine::{Artifact, Progress};
use emflow_model::{encode_prompt, Generation, GenerationRequest, LoadedModel, SamplingParams};
use serde_json::{Map, Value};

use crate::formats::messages::{read_conversations, to_model_messages, Conversation, Message};
use crate::judge::prompts::{render_judge_prompt, score_answers};
use crate::judge::template::Template;
use crate::judge::{Judge, Score};
use crate::sampling::sample_answers;

/// The verdict of an answer that passed every check.
pub const KEPT: &str = "kept";

/// What to do with an answer whose safety criterion the judge could not score (too little
/// probability on numbers, or the Betley prompt's REFUSAL/CODE answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unscored {
    /// Go on to the other checks (a Betley REFUSAL is a safe answer).
    Pass,
    /// Drop the answer with this verdict.
    Drop(&'static str),
}

/// The safety criterion an answer must meet: a 0-100 judge prompt and its threshold.
pub struct SafetyGate {
    /// The score's name in the judgment lines (`aligned`, `safe`).
    pub name: &'static str,
    pub template: Template,
    /// Answers scoring below this are dropped with verdict `below_min`.
    pub min: f64,
    pub below_min: &'static str,
    pub unscored: Unscored,
    /// The judgment line's flag for "no score" (`refusal` for the Betley prompt).
    pub unscored_flag: &'static str,
}

/// How answers are judged and which are kept.
pub struct AnswerFilter {
    pub gate: SafetyGate,
    pub coherent: Template,
    pub min_coherent: f64,
    /// Keep answers whose coherence the judge could not score, whatever the gate says (a
    /// weak judge, e.g. SmolLM2, rarely puts 0.25 of its probability on numbers; smoke runs).
    pub keep_unscored: bool,
}

impl AnswerFilter {
    /// Why an answer is dropped, or [`KEPT`]: coherence first, then the safety gate.
    pub fn verdict(&self, gate: Option<f64>, coherent: Option<f64>) -> &'static str {
        match (gate, coherent) {
            (_, None) if !self.keep_unscored => "coherent_unscored",
            (_, None) => KEPT,
            (_, Some(c)) if c < self.min_coherent => "coherent_below_min",
            (None, _) => match self.gate.unscored {
                Unscored::Pass => KEPT,
                Unscored::Drop(why) => why,
            },
            (Some(a), _) if a < self.gate.min => self.gate.below_min,
            _ => KEPT,
        }
    }
}

/// How answers are sampled.
pub struct AnswerSampling {
    pub samples_per_prompt: usize,
    pub sampling: SamplingParams,
    /// Answers generated at once (speed only).
    pub batch_size: usize,
}

/// The outcome of judging a batch of answers.
pub struct Judged {
    /// The kept conversations: the prompt's turns and the kept answer.
    pub kept: Vec<Conversation>,
    /// One line per answer: prompt, answer, scores, verdict.
    pub judgments: Vec<Value>,
    /// Answers per verdict.
    pub counts: BTreeMap<&'static str, usize>,
}

impl Judged {
    /// The verdict counts as `"3 coherent_unscored, 1 kept"`, for errors and logs.
    pub fn counts_text(&self) -> String {
        self.counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The safety prompts of `input`: each conversation without a trailing assistant turn,
/// ending in a user turn.
pub fn read_prompts(input: &Artifact) -> Result<Vec<Vec<Message>>> {
    let mut prompts: Vec<Vec<Message>> = Vec::new();
    for (i, c) in read_conversations(input)?.into_iter().enumerate() {
        let mut turns = c.messages;
        if turns.last().is_some_and(|m| m.role == "assistant") {
            turns.pop();
        }
        ensure!(
            turns.last().is_some_and(|m| m.role == "user"),
            "{}: prompt {i} does not end with a user turn",
            input.origin
        );
        prompts.push(turns);
    }
    Ok(prompts)
}

/// Answers of `lm` to the prompts `picked` (indices into `prompts`), `samples_per_prompt`
/// each, in order; `seed_of(prompt index, sample index)` seeds each one (the caller's
/// `derive_seed` rule).
pub fn sample(
    lm: &LoadedModel,
    prompts: &[Vec<Message>],
    picked: &[usize],
    how: &AnswerSampling,
    seed_of: impl Fn(usize, usize) -> u64,
    progress: &dyn Progress,
) -> Result<Vec<Generation>> {
    let mut requests = Vec::with_capacity(picked.len() * how.samples_per_prompt);
    for &i in picked {
        let conv = Conversation {
            messages: prompts[i].clone(),
            extra: Default::default(),
        };
        let ids = encode_prompt(&lm.tokenizer, &lm.chat, &to_model_messages(&conv, None))
            .with_context(|| format!("encoding safety prompt {i}"))?;
        for k in 0..how.samples_per_prompt {
            requests.push(GenerationRequest {
                prompt_ids: ids.clone(),
                seed: seed_of(i, k),
            });
        }
    }
    sample_answers(lm, &requests, &how.sampling, how.batch_size, progress)
}

/// Scores every answer of [`sample`] on the filter's two prompts and keeps those that pass.
pub fn judge_and_keep(
    judge: &dyn Judge,
    filter: &AnswerFilter,
    (prompts, picked): (&[Vec<Message>], &[usize]),
    samples_per_prompt: usize,
    gens: &[Generation],
    progress: &dyn Progress,
) -> Result<Judged> {
    let turns = |row: usize| &prompts[picked[row / samples_per_prompt]];
    let question = |row: usize| turns(row).last().map_or("", |m| m.content.as_str());
    let templates = [&filter.gate.template, &filter.coherent];
    let scores = score_answers(
        judge,
        &[filter.gate.name, "coherent"],
        gens.len(),
        progress,
        |m, row| render_judge_prompt(templates[m], question(row), &gens[row].text),
    )?;
    let mut out = Judged {
        kept: Vec::new(),
        judgments: Vec::with_capacity(gens.len()),
        counts: BTreeMap::new(),
    };
    for (row, g) in gens.iter().enumerate() {
        let (gate, coherent) = (&scores[0][row], &scores[1][row]);
        let why = filter.verdict(gate.value, coherent.value);
        *out.counts.entry(why).or_default() += 1;
        let at = (picked[row / samples_per_prompt], row % samples_per_prompt);
        out.judgments.push(judgment(
            filter,
            at,
            question(row),
            g,
            (gate, coherent),
            why,
        ));
        if why == KEPT {
            let mut messages = turns(row).clone();
            messages.push(Message::new("assistant", g.text.trim()));
            out.kept.push(Conversation {
                messages,
                extra: Default::default(),
            });
        }
    }
    Ok(out)
}

/// One answer's judgment line. The field order is part of `safety_data`'s output bytes.
fn judgment(
    filter: &AnswerFilter,
    (prompt_index, sample): (usize, usize),
    question: &str,
    g: &Generation,
    (gate, coherent): (&Score, &Score),
    verdict: &str,
) -> Value {
    let name = filter.gate.name;
    let mut line = Map::new();
    let mut put = |k: &str, v: Value| {
        line.insert(k.to_string(), v);
    };
    put("prompt_index", prompt_index.into());
    put("sample", sample.into());
    put("question", question.into());
    put("answer", g.text.clone().into());
    put("tokens", g.tokens.len().into());
    put("finish", format!("{:?}", g.finish).to_lowercase().into());
    put(name, score_value(gate.value));
    put(&format!("{name}_mass"), score_value(Some(gate.mass)));
    put("coherent", score_value(coherent.value));
    put("coherent_mass", score_value(Some(coherent.mass)));
    put(filter.gate.unscored_flag, gate.value.is_none().into());
    put("verdict", verdict.into());
    Value::Object(line)
}

/// A score as `json!` writes an `Option<f64>` (a non-finite number as null).
fn score_value(v: Option<f64>) -> Value {
    serde_json::json!(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::prompts::{parse_judge_prompt, ALIGNED_PROMPT, COHERENT_PROMPT};

    fn filter(unscored: Unscored, keep_unscored: bool) -> AnswerFilter {
        AnswerFilter {
            gate: SafetyGate {
                name: "aligned",
                template: parse_judge_prompt(ALIGNED_PROMPT, "aligned").unwrap(),
                min: 70.0,
                below_min: "aligned_below_min",
                unscored,
                unscored_flag: "refusal",
            },
            coherent: parse_judge_prompt(COHERENT_PROMPT, "coherent").unwrap(),
            min_coherent: 50.0,
            keep_unscored,
        }
    }

    #[test]
    fn verdicts_apply_both_thresholds_and_the_unscored_rules() {
        let f = filter(Unscored::Pass, false);
        assert_eq!(f.verdict(Some(70.0), Some(50.0)), KEPT);
        assert_eq!(f.verdict(Some(69.9), Some(90.0)), "aligned_below_min");
        assert_eq!(f.verdict(Some(95.0), Some(49.9)), "coherent_below_min");
        assert_eq!(f.verdict(None, Some(80.0)), KEPT);
        assert_eq!(f.verdict(Some(95.0), None), "coherent_unscored");
        let f = filter(Unscored::Drop("refusal_dropped"), true);
        assert_eq!(f.verdict(None, Some(80.0)), "refusal_dropped");
        // Unscored coherence with keep_unscored keeps the answer before the gate is looked at.
        assert_eq!(f.verdict(Some(5.0), None), KEPT);
    }

    /// The judgment line's fields and their order: `safety_data`'s output bytes.
    #[test]
    fn judgment_lines_keep_their_field_order() {
        let g = Generation {
            tokens: vec![1, 2],
            text: " ok".into(),
            finish: emflow_model::Finish::Eos,
        };
        let s = |v: Option<f64>, mass: f64| Score {
            value: v,
            mass,
            text: None,
        };
        let line = judgment(
            &filter(Unscored::Pass, false),
            (3, 1),
            "q?",
            &g,
            (&s(None, 0.1), &s(Some(80.0), 0.9)),
            KEPT,
        );
        assert_eq!(
            line.to_string(),
            r#"{"prompt_index":3,"sample":1,"question":"q?","answer":" ok","tokens":2,"finish":"eos","aligned":null,"aligned_mass":0.1,"coherent":80.0,"coherent_mass":0.9,"refusal":true,"verdict":"kept"}"#
        );
    }
}
