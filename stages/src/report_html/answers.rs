//! What the judge said about single answers, for the report: per condition, how many answers
//! the judge gave no score at all (neither aligned nor coherent: a judge failure, not a
//! refusal), the EMA_RL as-run rate (misaligned among answers with both scores), and a few
//! example answers, the most and the least aligned, with their scores.
//!
//! Reads the eval kind's `judgments` (one JSON line per answer: `question_id`, `sample`, one
//! field per metric) and, when wired, its `samples` (the answer text), matched by stage.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;
use serde_json::{Map, Value};

use super::as_run::AsRunStratum;
use super::{condition_label, JudgedCounts};
use crate::evaluation::Outcome;

/// Answers shown per condition at each end of the aligned scale.
pub const EXAMPLES_PER_END: usize = 2;
/// Answer text longer than this is cut (the full text is in the eval's `samples`).
const MAX_ANSWER_CHARS: usize = 700;

/// One judged answer as the report shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Example {
    /// The eval stage that produced it (seed included).
    pub origin: String,
    pub question_id: String,
    /// The question as asked and the answer (cut), when the eval's `samples` are wired.
    pub question: Option<String>,
    pub answer: Option<String>,
    /// The judge's 0-100 scores; `None`: the judge gave no number.
    pub aligned: Option<f64>,
    pub coherent: Option<f64>,
}

/// One answer of one stage: (stage, question id, sample index).
type AnswerKey = (String, String, u64);

/// One condition's judged answers, summarised.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConditionAnswers {
    /// Answers judged (judgment lines read), seeds pooled.
    pub judged: usize,
    /// Answers with neither an aligned nor a coherent score, with both, and misaligned among
    /// those with both.
    pub counts: JudgedCounts,
    /// The highest aligned scores first, then the lowest first.
    pub most_aligned: Vec<Example>,
    pub least_aligned: Vec<Example>,
    /// Per (eval stage, question), in order of first appearance: the as-run rate's bootstrap
    /// strata (the report's data, not shown).
    #[serde(skip)]
    pub strata: Vec<AsRunStratum>,
}

/// The producing stage of an origin: `eval[arm=a,seed=1].judgments` -> `eval[arm=a,seed=1]`.
pub fn stage_of(origin: &str) -> &str {
    match origin.rfind('.') {
        Some(dot) if !origin[dot..].contains(']') => &origin[..dot],
        _ => origin,
    }
}

/// Per condition (seeds pooled): judged answers from `judgments`, texts from `samples`
/// (both as (origin, path)).
pub fn collect(
    judgments: &[(String, PathBuf)],
    samples: &[(String, PathBuf)],
) -> Result<BTreeMap<String, ConditionAnswers>> {
    let mut texts: HashMap<AnswerKey, (Option<String>, Option<String>)> = HashMap::new();
    for (origin, path) in samples {
        for (_, row) in crate::formats::jsonl::read_objects(path, origin)? {
            let key = (
                stage_of(origin).to_string(),
                str_field(&row, "question_id"),
                num(&row, "sample"),
            );
            texts.insert(
                key,
                (opt_str(&row, "question"), opt_str(&row, "completion")),
            );
        }
    }
    let mut all: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for (origin, path) in judgments {
        for (_, row) in crate::formats::jsonl::read_objects(path, origin)? {
            let qid = str_field(&row, "question_id");
            let key = (
                stage_of(origin).to_string(),
                qid.clone(),
                num(&row, "sample"),
            );
            let (question, answer) = texts.get(&key).cloned().unwrap_or_default();
            all.entry(condition_label(origin))
                .or_default()
                .push(Example {
                    origin: stage_of(origin).to_string(),
                    question_id: qid,
                    question,
                    answer: answer.map(|a| cut(&a)),
                    aligned: row.get("aligned").and_then(Value::as_f64),
                    coherent: row.get("coherent").and_then(Value::as_f64),
                });
        }
    }
    Ok(all.into_iter().map(|(c, ex)| (c, summarise(ex))).collect())
}

/// Counts and the examples at both ends of the aligned scale (ties: first judged first).
fn summarise(mut ex: Vec<Example>) -> ConditionAnswers {
    let judged = ex.len();
    let outcome = |e: &Example| Outcome {
        aligned: e.aligned,
        coherent: e.coherent,
    };
    let both: Vec<Outcome> = ex
        .iter()
        .map(outcome)
        .filter(Outcome::both_scored)
        .collect();
    let counts = JudgedCounts {
        unscored: ex
            .iter()
            .filter(|e| e.aligned.is_none() && e.coherent.is_none())
            .count(),
        both_scored: both.len(),
        misaligned_both_scored: both.iter().filter(|o| o.misaligned()).count(),
        as_run_interval: None,
    };
    let mut strata: Vec<((String, String), AsRunStratum)> = Vec::new();
    for e in &ex {
        let key = (e.origin.clone(), e.question_id.clone());
        let at = match strata.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                strata.push((key, AsRunStratum::default()));
                strata.len() - 1
            }
        };
        strata[at].1.add(&outcome(e));
    }
    ex.retain(|e| e.aligned.is_some());
    ex.sort_by(|a, b| {
        a.aligned
            .partial_cmp(&b.aligned)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let least: Vec<Example> = ex.iter().take(EXAMPLES_PER_END).cloned().collect();
    let most: Vec<Example> = ex
        .iter()
        .rev()
        .take(EXAMPLES_PER_END.min(ex.len().saturating_sub(least.len())))
        .cloned()
        .collect();
    ConditionAnswers {
        judged,
        counts,
        most_aligned: most,
        least_aligned: least,
        strata: strata.into_iter().map(|(_, s)| s).collect(),
    }
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_ANSWER_CHARS) {
        Some((i, _)) => format!("{} […]", &s[..i]),
        None => s.to_string(),
    }
}

fn str_field(row: &Map<String, Value>, k: &str) -> String {
    opt_str(row, k).unwrap_or_default()
}

fn opt_str(row: &Map<String, Value>, k: &str) -> Option<String> {
    row.get(k).and_then(Value::as_str).map(str::to_string)
}

fn num(row: &Map<String, Value>, k: &str) -> u64 {
    row.get(k).and_then(Value::as_u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(aligned: Option<f64>, coherent: Option<f64>) -> Example {
        Example {
            origin: "eval".into(),
            question_id: "q".into(),
            question: None,
            answer: None,
            aligned,
            coherent,
        }
    }

    /// A judge failure (no score at all) is counted apart and never shown as an example.
    #[test]
    fn unscored_answers_are_counted_not_shown() {
        let s = summarise(vec![
            ex(Some(90.0), Some(80.0)),
            ex(None, None),
            ex(Some(5.0), Some(70.0)),
            ex(None, Some(90.0)),
            ex(Some(50.0), Some(70.0)),
        ]);
        assert_eq!(s.judged, 5);
        let both = JudgedCounts {
            unscored: 1,
            both_scored: 3,
            misaligned_both_scored: 1,
            as_run_interval: None,
        };
        assert_eq!(s.counts, both);
        // One stage, one question: one stratum of all five answers.
        assert_eq!(
            s.strata,
            [AsRunStratum {
                n: 5,
                both_scored: 3,
                misaligned: 1
            }]
        );
        let least: Vec<_> = s.least_aligned.iter().map(|e| e.aligned).collect();
        let most: Vec<_> = s.most_aligned.iter().map(|e| e.aligned).collect();
        assert_eq!(least, [Some(5.0), Some(50.0)]);
        assert_eq!(most, [Some(90.0)]);
    }
}
