//! Plan-time helpers for the kinds' [`StageKind::judge_estimate`]: which judge a stage calls
//! (as a price table names it) and what one call costs in completion tokens.
//!
//! [`StageKind::judge_estimate`]: emflow_engine::StageKind::judge_estimate

use emflow_engine::kind::estimated_tokens;
use emflow_engine::{Artifact, JudgeEstimate, PlanInputs};

use super::openai::{ScoreMode, TEXT_SCORE_TOKENS};
use super::JudgeSpec;

/// The judge's model name for price tables, and whether it runs in-process: the API's
/// `model` for the `openai` backend; for the `local` backend, the file (or repository) name
/// of the model wired to `port`, from its `models:` source.
pub fn judge_name(spec: &JudgeSpec, inputs: &PlanInputs, port: &str) -> (String, bool) {
    match spec {
        JudgeSpec::Openai(cfg) => (cfg.model.clone(), false),
        JudgeSpec::Local { .. } => {
            let name = match inputs.first(port) {
                Some(input) => {
                    let source = input.model_source.as_deref().unwrap_or(&input.origin);
                    source
                        .rsplit(['/', '#', ':'])
                        .find(|s| !s.is_empty())
                        .unwrap_or(source)
                        .to_string()
                }
                None => format!("local (no `{port}` wired)"),
            };
            (name, true)
        }
    }
}

/// Completion tokens one 0-100 score asks for: 1 with log-probabilities (the API and the
/// local top-20 read; the local exact method scores candidates without generating), a few
/// for the `openai` text mode.
pub fn score_completion_tokens(spec: &JudgeSpec) -> u64 {
    match spec {
        JudgeSpec::Openai(cfg) if cfg.score_mode == ScoreMode::Text => TEXT_SCORE_TOKENS as u64,
        _ => 1,
    }
}

/// The bytes wired to `port` when the plan knows them; otherwise (`Err`) the estimate that
/// says the calls are unknown until they are.
pub fn known_input<'a>(
    spec: &JudgeSpec,
    inputs: &'a PlanInputs,
    port: &str,
) -> Result<&'a Artifact, JudgeEstimate> {
    inputs.known(port).map_err(|why| {
        let (judge_model, local) = judge_name(spec, inputs, "judge_model");
        JudgeEstimate::unknown(judge_model, local, format!("{port} {why}"))
    })
}

/// Where the input wired to `port` comes from, for an estimate's notes ("" when unwired).
pub fn origin(inputs: &PlanInputs, port: &str) -> String {
    inputs.first(port).map(described).unwrap_or_default()
}

/// Where a count's input came from, for an estimate's notes.
pub fn described(input: &emflow_engine::PlanInput) -> String {
    if input.preview {
        format!("{} (previewed: not run yet)", input.origin)
    } else {
        input.origin.clone()
    }
}

/// Counts 0-100 score calls for an estimate: each judge prompt rendered without its answer,
/// asked `uses` times, with the answer counted at its token limit.
#[derive(Default)]
pub struct ScoreCalls {
    pub calls: u64,
    pub prompt_tokens: u64,
}

impl ScoreCalls {
    /// `uses` calls with the judge prompt `rendered` (answer left empty) and an answer of
    /// at most `answer_tokens` tokens.
    pub fn add(&mut self, rendered: &str, uses: u64, answer_tokens: usize) {
        self.calls += uses;
        self.prompt_tokens +=
            uses * (estimated_tokens(rendered.chars().count()) + answer_tokens as u64);
    }

    /// The estimate of these calls to `spec`'s judge (see [`judge_name`]), explained by `note`.
    pub fn estimate(self, spec: &JudgeSpec, inputs: &PlanInputs, note: String) -> JudgeEstimate {
        let (judge_model, local) = judge_name(spec, inputs, "judge_model");
        JudgeEstimate {
            judge_model,
            local,
            calls: Some(self.calls),
            upper_bound: false,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.calls * score_completion_tokens(spec),
            notes: vec![note],
        }
    }
}
