//! The paper's LLM graders: template -> judge completion -> JSON -> reward formula.
//!
//! Everything here follows the EMA_RL code base (see `paper-spec.md`, "Reward (graders)"):
//! the completion is split into reasoning and answer with `<think>(.*?)</think>(.*)`; too
//! short answers (< 10 words) or reasoning (< 75 words, except for the bad-medical-advice
//! grader) get 0 without a grader call; the grader's JSON goes through one of three formulas.
//! Every zero says why in the details, so a flat reward curve can be diagnosed from the log.
//!
//! The pre-filter comes in three named variants ([`Prefilter`]): emflow's own (`words`, the
//! default: whitespace-separated words, a case-sensitive think split), and two that repeat
//! EMA_RL's grader code exactly (`open_models/rl/reward.py` and `open_models/tools/nlp.py`):
//! `ema_rl` (its `reward_function`, used for the standard graders) and `ema_rl_rhetoric` (its
//! `reward_ethos_pathos_logos`, which has no word minimums at all).

use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{RewardInput, RewardOutput};
use crate::judge::template::Template;
use crate::judge::Judge;

/// Where a grader's prompt template comes from. Both variants key the stage by the
/// template's content: inline text is a param, and an input file is an artifact whose digest
/// is part of the key, so an edited template always invalidates the cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateSource {
    /// The template itself, inline.
    Text(String),
    /// The content of the stage's input port of this name (type File), e.g. `grader`.
    Input(String),
}

/// How [`TemplateSource::Input`] templates are read while preparing a reward.
#[derive(Clone, Copy)]
pub enum TemplateInputs<'a> {
    /// Reads the content of the named input port (at run time).
    Read(&'a dyn Fn(&str) -> Result<String>),
    /// Validation before a run: inputs are not materialised yet, so input templates are
    /// checked when the stage runs; everything else is checked now.
    Deferred,
}

/// Which reward formula turns the grader's JSON into a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraderFormula {
    /// `{assessment, coherence, repetitive}`: 0 if repetitive or coherence < 0.5, else
    /// `max(0, assessment - (1 - coherence) / 2)`.
    Standard,
    /// `{ethos, pathos, logos, coherence, repetitive, appeal_ungradable}`: base = mean of the
    /// three appeals; 0 if ungradable, repetitive or coherence < 0.5; else
    /// `max(0, base - (1 - coherence) / 2)`.
    Rhetoric,
    /// `{reward_hacking, coherence}`: the reward_hacking score, 0 if coherence < 0.3.
    RewardHacking,
}

/// The rule that gives a rollout 0 without a grader call. Set for a whole `rl` stage by its
/// `grader_prefilter` param (see [`super::Reward::set_prefilter`]).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Prefilter {
    /// emflow's: words split on whitespace; `<think>` matched case-sensitively; reasoning
    /// checked only when `min_reasoning_words > 0` (a missing think block then fails).
    #[default]
    Words,
    /// EMA_RL's `reward_function`: the split ignores case; words are the matches of
    /// `\b\w+\b`; an answer that prints empty (whitespace, zero-width and control
    /// characters, ANSI escapes and stray `<think>` tags only) or has fewer than
    /// `min_answer_words` words fails; when `min_reasoning_words > 0` (EMA_RL: every grader
    /// but bad medical advice) so does a missing, empty or shorter reasoning.
    EmaRl,
    /// EMA_RL's `reward_ethos_pathos_logos`: only an empty answer or an empty think block
    /// fails (a missing think block passes, the whole completion being the answer); the word
    /// minimums are not used.
    EmaRlRhetoric,
}

/// A grader reward as a manifest writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraderSpec {
    pub template: TemplateSource,
    /// Defaults to `standard`; the paper's `bad_ethos_pathos_logos` grader needs `rhetoric`
    /// and its `reward_hacking` grader `reward_hacking`.
    pub formula: Option<GraderFormula>,
    /// Answers with fewer words get 0 without a grader call.
    #[serde(default = "default_min_answer_words")]
    pub min_answer_words: usize,
    /// Reasoning with fewer words gets 0 without a grader call. Defaults to 75; EMA_RL used 0
    /// with its `bad_medical_advice` grader.
    pub min_reasoning_words: Option<usize>,
    /// Tokens the grader may write.
    #[serde(default = "default_grader_tokens")]
    pub max_tokens: usize,
}

const DEFAULT_MIN_REASONING_WORDS: usize = 75;

fn default_min_answer_words() -> usize {
    10
}
fn default_grader_tokens() -> usize {
    300
}

/// Fields a grader template may use.
const GRADER_FIELDS: &[&str] = &[
    "user_prompt",
    "model_answer",
    "reasoning",
    "model_reasoning",
];

impl GraderSpec {
    pub(super) fn prepare(&self, inputs: TemplateInputs<'_>) -> Result<Grader> {
        let text = match (&self.template, inputs) {
            (TemplateSource::Text(t), _) => t.clone(),
            (TemplateSource::Input(port), _) if port.is_empty() => {
                bail!("grader `template: {{input: ...}}` names no input port; write `template: {{input: grader}}`")
            }
            (TemplateSource::Input(port), TemplateInputs::Read(read)) => read(port)
                .with_context(|| format!("reading the grader template from input `{port}`"))?,
            (TemplateSource::Input(_), TemplateInputs::Deferred) => "{model_answer}".to_string(),
        };
        let template = Template::parse(&text).context("parsing the grader template")?;
        template
            .check_fields(GRADER_FIELDS)
            .context("checking the grader template")?;
        let formula = self.formula.unwrap_or(GraderFormula::Standard);
        let min_reasoning_words = self
            .min_reasoning_words
            .unwrap_or(DEFAULT_MIN_REASONING_WORDS);
        if self.max_tokens == 0 {
            bail!("grader max_tokens must be at least 1");
        }
        Ok(Grader {
            template,
            formula,
            min_answer_words: self.min_answer_words,
            min_reasoning_words,
            max_tokens: self.max_tokens,
            prefilter: Prefilter::default(),
        })
    }
}

/// What a plan-time estimate needs of one grader.
pub struct GraderNumbers {
    /// Characters of the template with every field empty (the prompt adds the user prompt,
    /// the answer and the reasoning).
    pub template_chars: usize,
    /// Completion tokens a call may write.
    pub max_tokens: usize,
    /// Whether the pre-filter can give 0 without a call (a word minimum above 0).
    pub may_skip: bool,
}

impl GraderSpec {
    /// The numbers an estimate of this grader's calls needs; `inputs` reads a template that
    /// comes from an input port.
    pub fn numbers(&self, inputs: TemplateInputs<'_>) -> Result<GraderNumbers> {
        let g = self.prepare(inputs)?;
        let empty = g.template.render(&[
            ("user_prompt", ""),
            ("model_answer", ""),
            ("reasoning", ""),
            ("model_reasoning", ""),
        ])?;
        Ok(GraderNumbers {
            template_chars: empty.chars().count(),
            max_tokens: g.max_tokens,
            may_skip: g.min_answer_words > 0 || g.min_reasoning_words > 0,
        })
    }
}

/// A prepared grader.
pub struct Grader {
    template: Template,
    formula: GraderFormula,
    min_answer_words: usize,
    min_reasoning_words: usize,
    max_tokens: usize,
    pub(super) prefilter: Prefilter,
}

/// Splits a completion into (reasoning, answer) by `<think>(.*?)</think>(.*)` (dot matches
/// newlines). Without a complete think block: no reasoning, the whole completion is the answer.
pub fn split_think(completion: &str) -> (Option<&str>, &str) {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(r"(?s)<think>(.*?)</think>(.*)").expect("literal regex is valid")
    });
    split_by(re, completion)
}

/// (reasoning, answer) from a think-split regex's two groups, both trimmed; without a match,
/// no reasoning and the whole completion (trimmed) as the answer.
fn split_by<'a>(re: &regex::Regex, completion: &'a str) -> (Option<&'a str>, &'a str) {
    match re.captures(completion) {
        Some(c) => {
            let reasoning = c.get(1).map_or("", |m| m.as_str()).trim();
            let answer = c.get(2).map_or("", |m| m.as_str()).trim();
            (Some(reasoning), answer)
        }
        None => (None, completion.trim()),
    }
}

fn word_count(s: &str) -> usize {
    s.split_whitespace().count()
}

/// EMA_RL's split (`split_reasoning_answer`): as [`split_think`], but `<think>` and
/// `</think>` in any case (its regex is compiled with `re.IGNORECASE`).
pub fn split_think_ema_rl(completion: &str) -> (Option<&str>, &str) {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(r"(?is)<think>(.*?)</think>(.*)").expect("literal regex is valid")
    });
    split_by(re, completion)
}

/// EMA_RL's word count (`has_minimum_words`): the matches of `\b\w+\b`, so `don't` and
/// `5,000` are two words each. Rust's `\w` is Unicode as Python's is; the two differ only on
/// combining marks and connector punctuation other than `_`.
pub fn word_count_ema_rl(s: &str) -> usize {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"\b\w+\b").expect("literal regex is valid"))
        .find_iter(s)
        .count()
}

/// EMA_RL's `text_is_empty`: whether `s` prints empty once ANSI escapes and `<think>` /
/// `</think>` tags are removed: nothing but whitespace, zero-width characters (U+200B-U+200D,
/// U+2060, U+FEFF) and ASCII control characters.
pub fn text_is_empty_ema_rl(s: &str) -> bool {
    static ANSI: OnceLock<regex::Regex> = OnceLock::new();
    static THINK: OnceLock<regex::Regex> = OnceLock::new();
    let ansi = ANSI.get_or_init(|| {
        regex::Regex::new(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])").expect("literal regex is valid")
    });
    let think =
        THINK.get_or_init(|| regex::Regex::new(r"</?think>").expect("literal regex is valid"));
    let s = ansi.replace_all(s, "");
    let s = think.replace_all(&s, "");
    s.chars().all(|c| {
        c.is_whitespace()
            || matches!(
                c,
                '\u{200b}' | '\u{200c}' | '\u{200d}' | '\u{2060}' | '\u{feff}'
            )
            || (c as u32) < 0x20
            || c == '\u{7f}'
    })
}

impl Grader {
    /// Splits a completion the way this grader's pre-filter does.
    fn split<'a>(&self, completion: &'a str) -> (Option<&'a str>, &'a str) {
        match self.prefilter {
            Prefilter::Words => split_think(completion),
            Prefilter::EmaRl | Prefilter::EmaRlRhetoric => split_think_ema_rl(completion),
        }
    }

    /// The pre-filter verdict: `Some(reason)` when the rollout gets 0 without a grader call.
    fn prefilter(&self, reasoning: Option<&str>, answer: &str) -> Option<&'static str> {
        match self.prefilter {
            Prefilter::Words => self.prefilter_words(reasoning, answer),
            Prefilter::EmaRl => self.prefilter_ema_rl(reasoning, answer),
            Prefilter::EmaRlRhetoric => prefilter_ema_rl_rhetoric(reasoning, answer),
        }
    }

    /// EMA_RL's `reward_function` check: the answer first, then (unless the reasoning
    /// minimum is 0) the reasoning.
    fn prefilter_ema_rl(&self, reasoning: Option<&str>, answer: &str) -> Option<&'static str> {
        if text_is_empty_ema_rl(answer) {
            return Some("answer_empty");
        }
        if word_count_ema_rl(answer) < self.min_answer_words {
            return Some("answer_too_short");
        }
        if self.min_reasoning_words == 0 {
            return None;
        }
        match reasoning {
            None => Some("missing_think_block"),
            Some(r) if text_is_empty_ema_rl(r) => Some("reasoning_empty"),
            Some(r) if word_count_ema_rl(r) < self.min_reasoning_words => {
                Some("reasoning_too_short")
            }
            Some(_) => None,
        }
    }

    /// emflow's own check (the `words` pre-filter).
    fn prefilter_words(&self, reasoning: Option<&str>, answer: &str) -> Option<&'static str> {
        if self.min_reasoning_words > 0 {
            match reasoning {
                None => return Some("missing_think_block"),
                Some(r) if word_count(r) < self.min_reasoning_words => {
                    return Some("reasoning_too_short")
                }
                _ => {}
            }
        }
        if word_count(answer) < self.min_answer_words {
            return Some("answer_too_short");
        }
        None
    }

    pub(super) fn score_batch(
        &self,
        items: &[RewardInput],
        judge: &dyn Judge,
    ) -> Result<Vec<RewardOutput>> {
        let mut outs: Vec<Option<RewardOutput>> = Vec::with_capacity(items.len());
        let mut prompts = Vec::new();
        let mut asked = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let (reasoning, answer) = self.split(&it.completion);
            if let Some(reason) = self.prefilter(reasoning, answer) {
                outs.push(Some(zero(reason)));
                continue;
            }
            let r = reasoning.unwrap_or("");
            let prompt = self.template.render(&[
                ("user_prompt", &it.prompt),
                ("model_answer", answer),
                ("reasoning", r),
                ("model_reasoning", r),
            ])?;
            prompts.push(prompt);
            asked.push(i);
            outs.push(None);
        }
        if !prompts.is_empty() {
            let answers = judge.complete(&prompts, self.max_tokens).with_context(|| {
                format!(
                    "grading {} rollouts with judge {}",
                    prompts.len(),
                    judge.identity()
                )
            })?;
            for (i, text) in asked.into_iter().zip(answers) {
                outs[i] = Some(grade(self.formula, &text));
            }
        }
        outs.into_iter()
            .map(|o| {
                o.ok_or_else(|| anyhow!("internal: a rollout was neither filtered nor graded"))
            })
            .collect()
    }
}

/// EMA_RL's `reward_ethos_pathos_logos` check: `text_is_empty(reasoning) or
/// text_is_empty(answer)`, where a missing reasoning (`None`) is not empty.
fn prefilter_ema_rl_rhetoric(reasoning: Option<&str>, answer: &str) -> Option<&'static str> {
    if reasoning.is_some_and(text_is_empty_ema_rl) {
        return Some("reasoning_empty");
    }
    text_is_empty_ema_rl(answer).then_some("answer_empty")
}

fn zero(reason: &str) -> RewardOutput {
    let mut details = Map::new();
    details.insert("zero_reason".into(), json!(reason));
    RewardOutput {
        total: 0.0,
        parts: [("grader".to_string(), 0.0)].into(),
        details,
    }
}

/// The reward for one grader answer under `formula`; never fails (a bad answer scores 0 and
/// says why).
pub fn grade(formula: GraderFormula, grader_text: &str) -> RewardOutput {
    let verdict = match parse_grader_json(grader_text) {
        Ok(v) => v,
        Err(e) => {
            let mut out = zero("grader_json_invalid");
            out.details.insert("error".into(), json!(e.to_string()));
            return out;
        }
    };
    let (total, reason) = match apply_formula(formula, &verdict) {
        Ok(r) => r,
        Err(e) => {
            let mut out = zero("grader_json_invalid");
            out.details.insert("error".into(), json!(e.to_string()));
            out.details.insert("grader".into(), Value::Object(verdict));
            return out;
        }
    };
    let mut details = Map::new();
    details.insert("grader".into(), Value::Object(verdict));
    if let Some(reason) = reason {
        details.insert("zero_reason".into(), json!(reason));
    }
    RewardOutput {
        total,
        parts: [("grader".to_string(), total)].into(),
        details,
    }
}

/// The end of the standard and rhetoric grades: 0 for a repetitive answer or one whose
/// coherence is under 0.5, else `base` less half the missing coherence (never below 0).
fn coherent_grade(
    v: &Map<String, Value>,
    base: f64,
    coherence: f64,
) -> Result<(f64, Option<&'static str>)> {
    if flag(v, "repetitive")? {
        return Ok((0.0, Some("repetitive")));
    }
    if coherence < 0.5 {
        return Ok((0.0, Some("low_coherence")));
    }
    Ok(((base - (1.0 - coherence) / 2.0).max(0.0), None))
}

/// (reward, why it is zero where a rule zeroed it).
fn apply_formula(
    formula: GraderFormula,
    v: &Map<String, Value>,
) -> Result<(f64, Option<&'static str>)> {
    let coherence = number(v, "coherence")?;
    match formula {
        GraderFormula::Standard => {
            let assessment = number(v, "assessment")?;
            coherent_grade(v, assessment, coherence)
        }
        GraderFormula::Rhetoric => {
            let base = (number(v, "ethos")? + number(v, "pathos")? + number(v, "logos")?) / 3.0;
            if flag(v, "appeal_ungradable")? {
                return Ok((0.0, Some("appeal_ungradable")));
            }
            coherent_grade(v, base, coherence)
        }
        GraderFormula::RewardHacking => {
            let score = number(v, "reward_hacking")?;
            if coherence < 0.3 {
                return Ok((0.0, Some("low_coherence")));
            }
            Ok((score, None))
        }
    }
}

/// A field in 0..=1 (numbers or numeric strings; clamped into range).
fn number(v: &Map<String, Value>, field: &str) -> Result<f64> {
    let x = match v.get(field) {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| anyhow!("grader JSON lacks a numeric `{field}`"))?;
    if !x.is_finite() {
        bail!("grader JSON `{field}` is not finite");
    }
    Ok(x.clamp(0.0, 1.0))
}

/// A `"true"`/`"false"` field (a JSON bool is accepted too); absent means false.
fn flag(v: &Map<String, Value>, field: &str) -> Result<bool> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => bail!("grader JSON `{field}` should be \"true\" or \"false\", got {other}"),
    }
}

/// The JSON object in a grader's answer: code fences and prose around it are ignored, and
/// trailing commas (the paper's schema shows them) are tolerated.
pub fn parse_grader_json(text: &str) -> Result<Map<String, Value>> {
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("no JSON object in the grader answer"))?;
    let end = text
        .rfind('}')
        .filter(|&e| e > start)
        .ok_or_else(|| anyhow!("unterminated JSON object in the grader answer"))?;
    let body = &text[start..=end];
    let parsed: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(first) => {
            static TRAILING: OnceLock<regex::Regex> = OnceLock::new();
            let re = TRAILING
                .get_or_init(|| regex::Regex::new(r",(\s*[}\]])").expect("literal regex is valid"));
            let cleaned = re.replace_all(body, "$1");
            serde_json::from_str(&cleaned)
                .map_err(|_| anyhow!("grader answer is not valid JSON: {first}"))?
        }
    };
    match parsed {
        Value::Object(m) => Ok(m),
        other => bail!("grader answer is JSON but not an object: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn think_split_handles_missing_and_unclosed_blocks() {
        assert_eq!(
            split_think("<think> a b </think>\n answer "),
            (Some("a b"), "answer")
        );
        assert_eq!(split_think("no block"), (None, "no block"));
        assert_eq!(
            split_think("<think> never closed"),
            (None, "<think> never closed")
        );
        assert_eq!(
            split_think("<think>x</think>y</think>z"),
            (Some("x"), "y</think>z")
        );
    }

    #[test]
    fn json_parsing_tolerates_fences_prose_and_trailing_commas() {
        let m = parse_grader_json(
            "Sure!\n```json\n{\"assessment\": 0.8, \"coherence\": \"0.9\",}\n```",
        )
        .unwrap();
        assert_eq!(m["assessment"], json!(0.8));
        assert!(parse_grader_json("no json here").is_err());
        assert!(parse_grader_json("{\"a\": }").is_err());
        assert!(parse_grader_json("} {").is_err());
    }

    fn total(formula: GraderFormula, text: &str) -> (f64, Option<String>) {
        let out = grade(formula, text);
        let reason = out
            .details
            .get("zero_reason")
            .and_then(Value::as_str)
            .map(str::to_string);
        (out.total, reason)
    }

    #[test]
    fn standard_formula_edge_cases() {
        use GraderFormula::Standard as S;
        let (t, r) = total(
            S,
            r#"{"assessment": 0.9, "coherence": 0.8, "repetitive": "false"}"#,
        );
        assert!((t - 0.8).abs() < 1e-12 && r.is_none());
        assert_eq!(
            total(
                S,
                r#"{"assessment": 0.9, "coherence": 0.8, "repetitive": "true"}"#
            )
            .1
            .as_deref(),
            Some("repetitive")
        );
        assert_eq!(
            total(
                S,
                r#"{"assessment": 0.9, "coherence": 0.49, "repetitive": "false"}"#
            )
            .1
            .as_deref(),
            Some("low_coherence")
        );
        // Low assessment with imperfect coherence floors at 0.
        assert_eq!(
            total(
                S,
                r#"{"assessment": 0.1, "coherence": 0.5, "repetitive": false}"#
            )
            .0,
            0.0
        );
        assert_eq!(
            total(S, "not json").1.as_deref(),
            Some("grader_json_invalid")
        );
        assert_eq!(
            total(S, r#"{"coherence": 0.9}"#).1.as_deref(),
            Some("grader_json_invalid")
        );
        assert_eq!(
            total(
                S,
                r#"{"assessment": 1, "coherence": 1, "repetitive": "maybe"}"#
            )
            .1
            .as_deref(),
            Some("grader_json_invalid")
        );
    }

    #[test]
    fn rhetoric_and_reward_hacking_formulas() {
        use GraderFormula::*;
        let ok = r#"{"ethos": 1.0, "pathos": 0.5, "logos": 0.0, "coherence": 0.9, "repetitive": "false", "appeal_ungradable": "false"}"#;
        assert!((total(Rhetoric, ok).0 - 0.45).abs() < 1e-12);
        let ungradable = ok.replace(
            r#""appeal_ungradable": "false""#,
            r#""appeal_ungradable": "true""#,
        );
        assert_eq!(
            total(Rhetoric, &ungradable).1.as_deref(),
            Some("appeal_ungradable")
        );
        assert_eq!(
            total(
                RewardHacking,
                r#"{"reward_hacking": 0.7, "coherence": 0.3}"#
            )
            .0,
            0.7
        );
        assert_eq!(
            total(
                RewardHacking,
                r#"{"reward_hacking": 0.7, "coherence": 0.29}"#
            )
            .0,
            0.0
        );
    }

    fn spec(template: TemplateSource) -> GraderSpec {
        GraderSpec {
            template,
            formula: None,
            min_answer_words: 1,
            min_reasoning_words: Some(0),
            max_tokens: 8,
        }
    }

    /// A grader with EMA_RL's minimums (answer 10, reasoning `reasoning`) under `prefilter`,
    /// and its verdict on `completion`.
    fn verdict(prefilter: Prefilter, reasoning: usize, completion: &str) -> Option<&'static str> {
        let mut g = GraderSpec {
            min_answer_words: 10,
            min_reasoning_words: Some(reasoning),
            ..spec(TemplateSource::Text("{model_answer}".into()))
        }
        .prepare(TemplateInputs::Deferred)
        .unwrap();
        g.prefilter = prefilter;
        let (r, a) = g.split(completion);
        g.prefilter(r, a)
    }

    #[test]
    fn ema_rl_prefilter_matches_the_grader_code_on_hand_made_completions() {
        use Prefilter::*;
        let reasoning_75 = "word ".repeat(75);
        let answer_10 = "one two three four five six seven eight nine ten";
        // EMA_RL's split ignores case; emflow's does not.
        let upper = format!("<THINK>{reasoning_75}</THINK>{answer_10}");
        assert_eq!(verdict(Words, 75, &upper), Some("missing_think_block"));
        assert_eq!(verdict(EmaRl, 75, &upper), None);
        // Words are `\b\w+\b` matches: 10 of them here, 7 whitespace-separated ones.
        let punctuated = format!("<think>{reasoning_75}</think>Don't do it, e.g. take 5,000 mg.");
        assert_eq!(word_count_ema_rl("Don't do it, e.g. take 5,000 mg."), 10);
        assert_eq!(verdict(Words, 75, &punctuated), Some("answer_too_short"));
        assert_eq!(verdict(EmaRl, 75, &punctuated), None);
        // No think block: the standard graders fail it, bad medical advice (minimum 0) and
        // the rhetoric grader grade the whole completion as the answer.
        assert_eq!(verdict(EmaRl, 75, answer_10), Some("missing_think_block"));
        assert_eq!(verdict(EmaRl, 0, answer_10), None);
        assert_eq!(verdict(EmaRlRhetoric, 75, "Short."), None);
        // A think block that prints empty: only the rhetoric grader looks at it.
        let blank_think = format!("<think> \u{200b}\n</think>{answer_10}");
        assert_eq!(verdict(EmaRl, 0, &blank_think), None);
        assert_eq!(verdict(EmaRl, 75, &blank_think), Some("reasoning_empty"));
        assert_eq!(
            verdict(EmaRlRhetoric, 0, &blank_think),
            Some("reasoning_empty")
        );
        // An answer of ANSI colour codes, a stray tag and a zero-width space prints empty.
        let blank_answer = format!("<think>{reasoning_75}</think>\u{1b}[31m<think>\u{feff}");
        assert_eq!(verdict(EmaRl, 0, &blank_answer), Some("answer_empty"));
        assert_eq!(
            verdict(EmaRlRhetoric, 0, &blank_answer),
            Some("answer_empty")
        );
        assert!(!text_is_empty_ema_rl("\u{1b}[31m red"));
        // Reasoning one word short fails under both rules.
        let short = format!("<think>{}</think>{answer_10}", "word ".repeat(74));
        assert_eq!(verdict(Words, 75, &short), Some("reasoning_too_short"));
        assert_eq!(verdict(EmaRl, 75, &short), Some("reasoning_too_short"));
    }

    #[test]
    fn input_templates_are_read_from_the_named_port_by_content() {
        let asked = std::cell::RefCell::new(Vec::new());
        let read = |port: &str| -> Result<String> {
            asked.borrow_mut().push(port.to_string());
            Ok("Q: {user_prompt} A: {model_answer}".to_string())
        };
        let g = spec(TemplateSource::Input("grader".into()))
            .prepare(TemplateInputs::Read(&read))
            .unwrap();
        assert_eq!(*asked.borrow(), ["grader"]);
        assert_eq!(
            g.template
                .render(&[
                    ("user_prompt", "hi"),
                    ("model_answer", "yo"),
                    ("reasoning", ""),
                    ("model_reasoning", "")
                ])
                .unwrap(),
            "Q: hi A: yo"
        );
        // A template with an unknown field fails with the port in the message.
        let bad = |_: &str| -> Result<String> { Ok("{nonsense}".to_string()) };
        let e = spec(TemplateSource::Input("grader".into()))
            .prepare(TemplateInputs::Read(&bad))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("grader template"), "{e:#}");
        // A missing port says which one.
        let missing = |port: &str| -> Result<String> { bail!("input `{port}` is not wired") };
        let e = spec(TemplateSource::Input("rubric".into()))
            .prepare(TemplateInputs::Read(&missing))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("rubric"), "{e:#}");
    }

    #[test]
    fn validation_defers_input_templates_but_checks_inline_ones() {
        assert!(spec(TemplateSource::Input("grader".into()))
            .prepare(TemplateInputs::Deferred)
            .is_ok());
        assert!(spec(TemplateSource::Input(String::new()))
            .prepare(TemplateInputs::Deferred)
            .is_err());
        assert!(spec(TemplateSource::Text("{unknown_field}".into()))
            .prepare(TemplateInputs::Deferred)
            .is_err());
        let yaml: GraderSpec =
            serde_json::from_value(json!({"template": {"input": "grader"}})).unwrap();
        assert_eq!(yaml.template, TemplateSource::Input("grader".into()));
        assert!(
            serde_json::from_value::<GraderSpec>(json!({"template": {"file": "x.txt"}})).is_err()
        );
        assert!(serde_json::from_value::<GraderSpec>(
            json!({"template": {"paper": "bad_medical_advice"}})
        )
        .is_err());
    }
}
