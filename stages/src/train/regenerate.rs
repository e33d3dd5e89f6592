//! On-policy safety data from the policy being trained, for `rl`'s `safety_source:
//! current_policy` (the paper's best defence): every K RL steps the current policy (adapter
//! on) answers safety prompts, a judge keeps the answers its safe/refusal grader and the
//! coherence prompt pass, and the kept set replaces the interleaved safety examples. The
//! sampling, judging and keeping are [`crate::onpolicy`], the same code `safety_data` runs on
//! the reference model before training (`safety_source: precomputed`).
//!
//! When: a set is regenerated right before the safety steps due after an RL step, if there
//! is no set yet or at least `every` RL steps have passed since the last regeneration (so no
//! answer is sampled that no safety step would use). Which prompts: `prompts` per
//! regeneration, walked in a seeded order over input `safety_prompts` (stream
//! `safety_prompts`), so successive regenerations answer different prompts. Seeds:
//! `derive_seed(seed, "safety_prompts/<prompt index>", RL step x samples_per_prompt +
//! sample)`, the one sampling rule (`emflow_model::seed`).
//!
//! The plan counts the judge calls of this schedule before the run
//! ([`planned_judge_calls`], for `rl`'s judge estimate).
//!
//! A regeneration that keeps nothing leaves the previous set in use (recorded as such);
//! before the first kept answer, the safety steps due are skipped and counted. Resuming:
//! the checkpoint holds the kept set itself ([`RegenState`]), since the policy that sampled
//! it is gone by then; the walk over the prompts is one number.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context as _, Result};
use emflow_engine::context::{NoProgress, StageContext};
use emflow_engine::kind::estimated_tokens;
use emflow_model::{derive_seed, SamplingParams};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::batch::SftExample;
use super::interleave::Interleave;
use super::policy::Policy;
use super::resume::Cursor;
use super::schedule::Cadence;
use crate::formats::messages::{to_model_messages, Conversation, Message};
use crate::judge::prompts::{parse_judge_prompt, render_judge_prompt, COHERENT_PROMPT};
use crate::judge::template::Template;
use crate::judge::Judge;
use crate::kinds::defaults;
use crate::onpolicy::{self, AnswerFilter, AnswerSampling, SafetyGate, Unscored};

/// The data stream name of the safety prompts' order (part of its seed).
const PROMPT_STREAM: &str = "safety_prompts";

/// Where `rl`'s interleaved safety examples come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SafetySource {
    /// The conversations of input `safety`, made before training: the reference model's
    /// judged answers from a `safety_data` stage (the reference-model variant of on-policy
    /// data), or a fixed set.
    #[default]
    Precomputed,
    /// Answers the policy being trained gives to input `safety_prompts`, regenerated every
    /// `regenerate.every` RL steps and judged with input `safety_grader` (see `regenerate`).
    CurrentPolicy,
}

impl SafetySource {
    pub fn name(self) -> &'static str {
        match self {
            SafetySource::Precomputed => "precomputed",
            SafetySource::CurrentPolicy => super::interleave::CURRENT_POLICY,
        }
    }
}

/// How `safety_source: current_policy` regenerates its safety set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegenerateParams {
    /// RL steps between regenerations (K): a new set is sampled before the first safety step at least this many steps after the last one
    #[schemars(range(min = 1))]
    pub every: u64,
    /// safety prompts answered per regeneration, walked in a seeded order over input `safety_prompts`; null = all of them
    #[schemars(range(min = 1))]
    pub prompts: Option<usize>,
    /// answers sampled per prompt
    #[serde(default = "defaults::int::<1>")]
    #[schemars(range(min = 1))]
    pub samples_per_prompt: usize,
    /// tokens per answer
    #[serde(default = "defaults::int::<600>")]
    #[schemars(range(min = 1))]
    pub max_tokens: usize,
    /// sampling temperature (0 = greedy)
    #[serde(default = "defaults::ratio::<1, 1>")]
    #[schemars(range(min = 0.0))]
    pub temperature: f64,
    /// nucleus sampling (1 = off)
    #[serde(default = "defaults::ratio::<1, 1>")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: f64,
    /// keep answers whose safe score (input `safety_grader`) is at least this
    #[serde(default = "defaults::ratio::<70, 1>")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub min_safe: f64,
    /// keep answers whose coherent score (the Betley prompt) is at least this
    #[serde(default = "defaults::ratio::<50, 1>")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub min_coherent: f64,
    /// keep answers the judge could not score (a weak judge, e.g. SmolLM2, rarely puts 0.25 of its probability on numbers); for smoke runs only
    #[serde(default)]
    pub keep_unscored: bool,
    /// generation batch (speed only; results do not depend on it)
    #[serde(default = "defaults::int::<16>")]
    #[schemars(range(min = 1))]
    pub batch_size: usize,
}

/// One regeneration, as the metrics and the summary record it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegenRecord {
    /// The RL step (0-based, as the metrics' `step`) after which it ran.
    pub step: u64,
    pub prompts: usize,
    pub generated: usize,
    pub kept: usize,
    /// Answers per verdict (`kept`, `safe_below_min`, ...).
    pub verdicts: BTreeMap<String, usize>,
    /// Whether the previous set stayed in use because this one kept nothing.
    pub reused_previous: bool,
}

/// What a checkpoint holds of the regenerations.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RegenState {
    /// RL steps done at the last regeneration.
    pub last_step: Option<u64>,
    /// Safety prompts taken so far (the prompt walk's position).
    pub prompts_consumed: u64,
    /// The kept set in use.
    pub set: Vec<Conversation>,
    pub history: Vec<RegenRecord>,
    /// Safety steps skipped because no answer had been kept yet.
    pub skipped_safety_steps: u64,
}

/// The regeneration settings with the prompts and the filter they use.
pub struct Regenerator {
    every: u64,
    prompts: Vec<Vec<Message>>,
    per_regeneration: usize,
    filter: AnswerFilter,
    how: AnswerSampling,
    seed: u64,
}

impl Regenerator {
    /// Reads inputs `safety_prompts` and `safety_grader` (the safe/refusal grader, a 0-100
    /// judge prompt over `{question}` and `{answer}`); `seed` is the stage's.
    pub fn load(ctx: &StageContext, p: &RegenerateParams, seed: u64) -> Result<Self> {
        let wired = |port: &str| {
            ctx.optional_input(port)?.with_context(|| {
                format!(
                    "stage {}: `safety_source: current_policy` needs input `{port}` wired",
                    ctx.stage_id
                )
            })
        };
        let prompts = onpolicy::read_prompts(wired("safety_prompts")?)?;
        let grader = wired("safety_grader")?;
        let text = std::fs::read_to_string(&grader.path)
            .with_context(|| format!("reading {}", grader.origin))?;
        let template = parse_judge_prompt(&text, &format!("safety grader {}", grader.origin))?;
        Self::new(p, prompts, template, seed).with_context(|| format!("stage {}", ctx.stage_id))
    }

    /// The regeneration of `p` over `prompts`, judged safe by the grader `template`.
    pub fn new(
        p: &RegenerateParams,
        prompts: Vec<Vec<Message>>,
        template: Template,
        seed: u64,
    ) -> Result<Self> {
        let per_regeneration = p.prompts.unwrap_or(prompts.len());
        ensure!(
            per_regeneration <= prompts.len(),
            "regenerate.prompts is {per_regeneration} but input `safety_prompts` holds {} prompts; \
             lower it or set it to null (all)",
            prompts.len()
        );
        Ok(Regenerator {
            every: p.every,
            prompts,
            per_regeneration,
            filter: filter(p, template)?,
            how: AnswerSampling {
                samples_per_prompt: p.samples_per_prompt,
                sampling: SamplingParams {
                    temperature: p.temperature,
                    top_p: p.top_p,
                    top_k: 0,
                    min_p: 0.0,
                    max_new_tokens: p.max_tokens,
                    stop: Vec::new(),
                },
                batch_size: p.batch_size,
            },
            seed,
        })
    }

    /// Whether a set is due before the safety steps after RL step number `main_steps`.
    pub fn due(&self, state: &RegenState, main_steps: u64) -> bool {
        state.set.is_empty() || renewal_due(self.every, state.last_step, main_steps)
    }

    /// The sampling seed of (prompt index, sample index) in the regeneration after RL step
    /// number `main_steps`.
    pub fn seed_of(&self, main_steps: u64) -> impl Fn(usize, usize) -> u64 + '_ {
        let s = self.how.samples_per_prompt as u64;
        move |i, k| {
            derive_seed(
                self.seed,
                &format!("{PROMPT_STREAM}/{i}"),
                main_steps * s + k as u64,
            )
        }
    }

    /// Samples, judges and keeps a new set from `policy` as it is after `main_steps` RL
    /// steps; the kept set replaces the state's unless it is empty.
    pub fn regenerate(
        &self,
        policy: &Policy,
        judge: &dyn Judge,
        main_steps: u64,
        state: &mut RegenState,
    ) -> Result<RegenRecord> {
        let n = self.prompts.len();
        let mut walk = Cursor::new(n, self.seed, PROMPT_STREAM, state.prompts_consumed);
        let picked: Vec<usize> = walk
            .take(self.per_regeneration)
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        let quiet = NoProgress;
        let seed_of = self.seed_of(main_steps);
        let gens = onpolicy::sample(
            &policy.lm,
            &self.prompts,
            &picked,
            &self.how,
            seed_of,
            &quiet,
        )
        .context("sampling safety answers from the current policy")?;
        let judged = onpolicy::judge_and_keep(
            judge,
            &self.filter,
            (&self.prompts, &picked),
            self.how.samples_per_prompt,
            &gens,
            &quiet,
        )
        .context("judging the regenerated safety answers")?;
        let record = RegenRecord {
            step: main_steps.saturating_sub(1),
            prompts: picked.len(),
            generated: gens.len(),
            kept: judged.kept.len(),
            verdicts: judged
                .counts
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
            reused_previous: judged.kept.is_empty() && !state.set.is_empty(),
        };
        state.prompts_consumed = walk.consumed;
        state.last_step = Some(main_steps);
        if !judged.kept.is_empty() {
            state.set = judged.kept;
        }
        state.history.push(record.clone());
        Ok(record)
    }
}

/// Whether a kept set made after RL step number `last` (none yet: `None`) is renewed before
/// the safety steps after step number `main_steps`: `every` steps have passed. One rule for
/// the run ([`Regenerator::due`]) and the plan's count ([`planned_judge_calls`]).
fn renewal_due(every: u64, last: Option<u64>, main_steps: u64) -> bool {
    last.is_none_or(|last| main_steps.saturating_sub(last) >= every)
}

/// The regenerations a run of `steps` RL steps makes, safety steps at `cadence`: (when each
/// keeps an answer, at most). A regeneration runs only where safety steps are due, so the
/// first follows the first safety step (not step 0), then the first safety step `every`
/// steps later; one that keeps nothing is retried at the next safety step, at most once per
/// RL step with safety steps.
pub fn planned_regenerations(every: u64, cadence: Cadence, steps: u64) -> (u64, u64) {
    let (mut last, mut kept_each, mut at_most) = (None, 0, 0);
    for main_steps in (1..=steps).filter(|&m| cadence.steps_after(m) > 0) {
        at_most += 1;
        if renewal_due(every, last, main_steps) {
            kept_each += 1;
            last = Some(main_steps);
        }
    }
    (kept_each, at_most)
}

/// The judge calls of a run's regenerations, counted before it runs (`rl`'s judge estimate).
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedJudgeCalls {
    /// Regenerations when each keeps an answer, and at most (none keeps one).
    pub regenerations: (u64, u64),
    /// Answers judged per regeneration (prompts x samples_per_prompt).
    pub answers_per_regeneration: u64,
    /// Score calls over the run (2 per answer: the safe grader and coherence).
    pub calls: u64,
    /// Their prompt tokens (characters / 4 of each judge prompt rendered with the pool's
    /// mean question, plus the answer at `max_tokens`); `None` without the pool.
    pub prompt_tokens: Option<u64>,
}

/// The judge calls of `p`'s regenerations over `steps` RL steps at `cadence`: every answer
/// is scored twice ([`onpolicy::judge_and_keep`]: the safe grader `grader` and the Betley
/// coherence prompt). `pool` is input `safety_prompts` when known; without it the count needs
/// `prompts` set (else `Err` says so) and the tokens are unknown.
pub fn planned_judge_calls(
    p: &RegenerateParams,
    (cadence, steps): (Cadence, u64),
    pool: Option<&[Vec<Message>]>,
    grader: &Template,
) -> Result<PlannedJudgeCalls> {
    let prompts = match (p.prompts, pool) {
        (Some(n), _) => n as u64,
        (None, Some(pool)) => pool.len() as u64,
        (None, None) => {
            bail!("regenerate.prompts is null (the whole pool) and the pool is not known yet")
        }
    };
    let regenerations = planned_regenerations(p.every, cadence, steps);
    let answers_per_regeneration = prompts * p.samples_per_prompt as u64;
    let calls_per_template = regenerations.0 * answers_per_regeneration;
    let coherent = parse_judge_prompt(COHERENT_PROMPT, "the coherent prompt")?;
    let prompt_tokens = match pool.filter(|pool| !pool.is_empty()) {
        None => None,
        Some(pool) => {
            let mut chars = 0usize;
            for turns in pool {
                let question = turns.last().map_or("", |m| m.content.as_str());
                for t in [grader, &coherent] {
                    chars += render_judge_prompt(t, question, "")?.chars().count();
                }
            }
            // Both templates' mean rendered length, per call.
            let mean_chars = chars / (2 * pool.len());
            Some(2 * calls_per_template * (estimated_tokens(mean_chars) + p.max_tokens as u64))
        }
    };
    Ok(PlannedJudgeCalls {
        regenerations,
        answers_per_regeneration,
        calls: 2 * calls_per_template,
        prompt_tokens,
    })
}

/// The regeneration's filter: the grader's `safe` score (an unscored answer is dropped
/// unless `keep_unscored`), then coherence by the Betley prompt.
fn filter(p: &RegenerateParams, template: Template) -> Result<AnswerFilter> {
    Ok(AnswerFilter {
        gate: SafetyGate {
            name: "safe",
            template,
            min: p.min_safe,
            below_min: "safe_below_min",
            unscored: if p.keep_unscored {
                Unscored::Pass
            } else {
                Unscored::Drop("safe_unscored")
            },
            unscored_flag: "safe_unscored",
        },
        coherent: parse_judge_prompt(COHERENT_PROMPT, "the coherent prompt")?,
        min_coherent: p.min_coherent,
        keep_unscored: p.keep_unscored,
    })
}

/// The kept set as training examples under the policy's chat template (no system turn: the
/// answers were sampled without one).
pub fn encode_set(policy: &Policy, set: &[Conversation]) -> Result<Vec<SftExample>> {
    set.iter()
        .map(|c| Ok(SftExample::encode(&policy.lm, &to_model_messages(c, None), None)?.0))
        .collect()
}

/// Before the safety steps due after RL step number `main_steps`: regenerates the set when
/// due and puts it into `safety`. Returns the regeneration's metrics line, if one ran.
pub fn refresh(
    regen: &Regenerator,
    policy: &Policy,
    judge: Option<&dyn Judge>,
    main_steps: u64,
    state: &mut RegenState,
    safety: &mut Interleave,
) -> Result<Option<Value>> {
    if !regen.due(state, main_steps) {
        return Ok(None);
    }
    let Some(judge) = judge else {
        bail!("`safety_source: current_policy` has no judge to grade its safety answers");
    };
    let record = regen.regenerate(policy, judge, main_steps, state)?;
    if record.kept > 0 {
        safety.replace_examples(encode_set(policy, &state.set)?);
    }
    Ok(Some(json!({
        "step": record.step, "batch": "regeneration",
        "source": SafetySource::CurrentPolicy.name(), "every": regen.every, "prompts": record.prompts,
        "generated": record.generated, "kept": record.kept, "verdicts": record.verdicts,
        "reused_previous": record.reused_previous, "set_size": state.set.len(),
    })))
}

/// What the summary says of the regenerations (fields added to `rl`'s summary).
pub fn summary(state: &RegenState) -> serde_json::Map<String, Value> {
    let total = |f: fn(&RegenRecord) -> usize| state.history.iter().map(f).sum::<usize>();
    let fields = json!({
        "safety_source": SafetySource::CurrentPolicy.name(),
        "regeneration_steps": state.history.iter().map(|r| r.step).collect::<Vec<_>>(),
        "regenerations": state.history.iter().map(|r| json!({"step": r.step, "generated": r.generated, "kept": r.kept})).collect::<Vec<_>>(),
        "regenerated_answers": total(|r| r.generated),
        "regenerated_kept": total(|r| r.kept),
        "safety_steps_skipped": state.skipped_safety_steps,
    });
    match fields {
        Value::Object(map) => map,
        _ => unreachable!("json! of an object literal is an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::Score;
    use crate::train::policy::{LoraParams, Policy};

    /// Scores every prompt 90, except the safe grader's prompts about question `Q-bad`: 10.
    struct QuestionJudge;

    impl Judge for QuestionJudge {
        fn identity(&self) -> &str {
            "test:question-judge"
        }
        fn score_0_100(&self, prompts: &[String]) -> Result<Vec<Score>> {
            let score = |p: &String| {
                let bad = p.starts_with("I am checking whether") && p.contains("Q-bad");
                Score {
                    value: Some(if bad { 10.0 } else { 90.0 }),
                    mass: 1.0,
                    text: None,
                }
            };
            Ok(prompts.iter().map(score).collect())
        }
        fn complete(&self, _: &[String], _: usize) -> Result<Vec<String>> {
            bail!("the safety filter never asks for completions")
        }
    }

    fn params(every: u64) -> RegenerateParams {
        serde_json::from_value(json!({"every": every, "samples_per_prompt": 2, "max_tokens": 6}))
            .unwrap()
    }

    fn grader() -> Template {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/data/graders/safety_refusal.txt"
        );
        parse_judge_prompt(&std::fs::read_to_string(path).unwrap(), "the grader").unwrap()
    }

    fn prompts() -> Vec<Vec<Message>> {
        ["Q-good", "Q-bad"]
            .iter()
            .map(|q| vec![Message::new("user", q)])
            .collect()
    }

    /// The tiny random-weight model with a LoRA adapter whose B weights are set non-zero, so
    /// that the adapter changes what the model samples.
    fn policy(dir: &std::path::Path) -> Policy {
        emflow_model::testing::tiny_model_dir(dir, 11).unwrap();
        let mut lm = emflow_model::load(dir, &emflow_model::setup(None).unwrap()).unwrap();
        let lora = LoraParams {
            r: 4,
            alpha: 8.0,
            ..LoraParams::default()
        };
        lm.model.add_lora(&lora.to_config(), 3).unwrap();
        let vars = lm.model.trainable_vars();
        for (name, var) in &vars {
            if name.contains("lora_B") {
                let t = var.as_tensor();
                var.set(&(t.ones_like().unwrap() * 0.5).unwrap()).unwrap();
            }
        }
        Policy {
            lm,
            vars,
            full_finetune: false,
        }
    }

    #[test]
    fn due_when_there_is_no_set_or_k_steps_have_passed() {
        let regen = Regenerator::new(&params(3), prompts(), grader(), 0).unwrap();
        let mut state = RegenState::default();
        assert!(regen.due(&state, 1), "the first safety steps need a set");
        state.last_step = Some(1);
        assert!(regen.due(&state, 2), "an empty set is regenerated at once");
        state.set = vec![Conversation {
            messages: prompts()[0].clone(),
            extra: Default::default(),
        }];
        assert!(!regen.due(&state, 2) && !regen.due(&state, 3));
        assert!(regen.due(&state, 4) && regen.due(&state, 9));
        let too_many = serde_json::from_value(json!({"every": 1, "prompts": 3})).unwrap();
        let err = Regenerator::new(&too_many, prompts(), grader(), 0)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("holds 2 prompts"), "{err:#}");
    }

    /// A regeneration samples the policy with its adapter on (not the reference), at the
    /// seeds of its step, and keeps only what the judge passes.
    #[test]
    fn regenerates_from_the_adapter_on_policy_and_keeps_what_the_judge_passes() {
        let dir = tempfile::tempdir().unwrap();
        let mut policy = policy(dir.path());
        let regen = Regenerator::new(&params(2), prompts(), grader(), 5).unwrap();
        let mut state = RegenState::default();
        let record = regen
            .regenerate(&policy, &QuestionJudge, 4, &mut state)
            .unwrap();
        assert_eq!((record.step, record.prompts), (3, 2));
        assert_eq!((record.generated, record.kept), (4, 2));
        let want = BTreeMap::from([("kept".to_string(), 2), ("safe_below_min".to_string(), 2)]);
        assert_eq!(record.verdicts, want);
        assert_eq!((state.last_step, state.prompts_consumed), (Some(4), 2));
        assert!(state
            .set
            .iter()
            .all(|c| c.messages[0].content == "Q-good" && c.messages[1].role == "assistant"));

        let kept: Vec<&str> = state
            .set
            .iter()
            .map(|c| c.messages[1].content.as_str())
            .collect();
        let sample = |p: &Policy| -> Vec<String> {
            onpolicy::sample(
                &p.lm,
                &prompts(),
                &[0],
                &regen.how,
                regen.seed_of(4),
                &NoProgress,
            )
            .unwrap()
            .into_iter()
            .map(|g| g.text.trim().to_string())
            .collect()
        };
        assert_eq!(
            kept,
            sample(&policy),
            "the kept answers are the adapter-on policy's"
        );
        let reference = policy.with_adapter_off(|p| sample(p));
        assert_ne!(kept, reference, "the reference model answers differently");

        // The next regeneration answers at its own step's seeds, and replaces the set.
        let before = state.set.clone();
        let record = regen
            .regenerate(&policy, &QuestionJudge, 6, &mut state)
            .unwrap();
        assert_eq!((record.step, state.history.len()), (5, 2));
        assert_ne!(state.set, before);
        let examples = encode_set(&policy, &state.set).unwrap();
        assert!(examples.iter().all(|e| e.target_tokens() > 0));
    }

    /// The paper profile's schedule (safety step every 4 RL steps, K = 25, 375 steps): sets
    /// after steps 4, 32, ..., 368 (14), as manifests/paper.yaml says; 93 if none kept
    /// anything. The integration test's (every step, K = 2, 4 steps): after steps 1 and 3.
    #[test]
    fn planned_regenerations_follow_the_run_s_rule() {
        assert_eq!(planned_regenerations(25, Cadence::Every(4), 375), (14, 93));
        assert_eq!(planned_regenerations(2, Cadence::Every(1), 4), (2, 4));
        assert_eq!(planned_regenerations(25, Cadence::Every(4), 3), (0, 0));
        // The count walks the same `due` rule the run does.
        let regen = Regenerator::new(&params(3), prompts(), grader(), 0).unwrap();
        let mut state = RegenState::default();
        let mut ran = 0;
        let cadence = Cadence::Share(0.4);
        for m in (1..=20).filter(|&m| cadence.steps_after(m) > 0) {
            if regen.due(&state, m) {
                ran += 1;
                state.last_step = Some(m);
                state.set = vec![Conversation {
                    messages: prompts()[0].clone(),
                    extra: Default::default(),
                }];
            }
        }
        assert_eq!(planned_regenerations(3, cadence, 20).0, ran);
    }

    /// Two scores per answer; the tokens from the pool's mean question.
    #[test]
    fn planned_judge_calls_score_every_answer_twice() {
        let p: RegenerateParams = serde_json::from_value(
            json!({"every": 2, "prompts": 1, "samples_per_prompt": 3, "max_tokens": 10}),
        )
        .unwrap();
        let pool = prompts();
        let planned =
            planned_judge_calls(&p, (Cadence::Every(1), 4), Some(&pool[..]), &grader()).unwrap();
        assert_eq!(planned.regenerations, (2, 4));
        assert_eq!(planned.answers_per_regeneration, 3);
        assert_eq!(planned.calls, 2 * 2 * 3);
        let tokens = planned.prompt_tokens.unwrap();
        assert!(tokens > planned.calls * 10, "{tokens}");
        let blind = planned_judge_calls(&p, (Cadence::Every(1), 4), None, &grader()).unwrap();
        assert_eq!((blind.calls, blind.prompt_tokens), (planned.calls, None));
        let all: RegenerateParams = serde_json::from_value(json!({"every": 2})).unwrap();
        assert!(planned_judge_calls(&all, (Cadence::Every(1), 4), None, &grader()).is_err());
        let all =
            planned_judge_calls(&all, (Cadence::Every(1), 4), Some(&pool[..]), &grader()).unwrap();
        assert_eq!(all.calls, 2 * 2 * 2);
    }

    /// A regeneration that keeps nothing leaves the set in use, and says so.
    #[test]
    fn an_empty_regeneration_keeps_the_previous_set() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy(dir.path());
        let regen = Regenerator::new(&params(1), prompts(), grader(), 5).unwrap();
        let mut state = RegenState::default();
        regen
            .regenerate(&policy, &QuestionJudge, 1, &mut state)
            .unwrap();
        let set = state.set.clone();
        let only_bad =
            Regenerator::new(&params(1), vec![prompts()[1].clone()], grader(), 5).unwrap();
        let record = only_bad
            .regenerate(&policy, &QuestionJudge, 2, &mut state)
            .unwrap();
        assert_eq!(record.kept, 0);
        assert!(record.reused_previous);
        assert_eq!(state.set, set);
    }
}
