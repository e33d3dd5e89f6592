//! Which safety data each interleaving arm trained on, read from its training metrics: every
//! `"batch": "safety"` line names whose answers it trained on (`source`, what the rows of the
//! stage's `safety` input say: `fixed`, `reference_model`; see
//! [`crate::train::interleave::ANSWER_SOURCE`]), and an `rl` stage with `safety_source:
//! current_policy` logs a `"batch": "regeneration"` line per regeneration (answers generated
//! and kept, every how many steps). One table, on the page and in the Markdown, so a reader
//! sees whether an arm trained on fixed targets, on the reference model's answers sampled
//! once, or on the policy's own answers as it trained. The labels come from the data's bytes,
//! never from stage names.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::page::MetricsFile;
use super::svg::esc;
use crate::train::interleave::{CURRENT_POLICY, FIXED, MODEL_WITH_ADAPTER, REFERENCE_MODEL};

/// One training stage's safety interleaving, as its metrics show it.
#[derive(Debug, PartialEq)]
pub struct SafetyRun {
    /// The metrics file's origin (stage with its matrix values).
    pub stage: String,
    /// `fixed targets`, `on-policy: reference model, sampled once`, `on-policy: current
    /// policy, every K steps` ([`source_label`]).
    pub source: String,
    /// RL steps (0-based) after which the set was regenerated.
    pub regeneration_steps: Vec<u64>,
    pub generated: u64,
    pub kept: u64,
    pub safety_steps: u64,
}

/// Every metrics file with safety steps or regenerations, in input order.
pub fn safety_runs(metrics: &[MetricsFile]) -> Vec<SafetyRun> {
    let batch = |r: &Map<String, Value>| r.get("batch").and_then(Value::as_str).map(String::from);
    let num = |r: &Map<String, Value>, k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    metrics
        .iter()
        .filter_map(|m| {
            let regens: Vec<&Map<String, Value>> = m
                .rows
                .iter()
                .filter(|r| batch(r).as_deref() == Some("regeneration"))
                .collect();
            let safety_steps = m
                .rows
                .iter()
                .filter(|r| batch(r).as_deref() == Some("safety"))
                .count() as u64;
            if regens.is_empty() && safety_steps == 0 {
                return None;
            }
            let first_safety = m
                .rows
                .iter()
                .find(|r| batch(r).as_deref() == Some("safety"));
            let source = source_label(regens.first().copied(), first_safety);
            Some(SafetyRun {
                stage: m.origin.clone(),
                source,
                regeneration_steps: regens.iter().map(|r| num(r, "step")).collect(),
                generated: regens.iter().map(|r| num(r, "generated")).sum(),
                kept: regens.iter().map(|r| num(r, "kept")).sum(),
                safety_steps,
            })
        })
        .collect()
}

/// The table's words for where a stage's safety answers came from: its first regeneration
/// line's `source` (with `every`), else its first safety line's. Metrics written before the
/// lines said (`rl` < 4, `sft` < 5) get the words the report always gave them.
fn source_label(regen: Option<&Map<String, Value>>, safety: Option<&Map<String, Value>>) -> String {
    let of = |r: Option<&Map<String, Value>>| {
        r.and_then(|r| r.get("source")?.as_str().map(String::from))
    };
    if let Some(r) = regen {
        let every = r.get("every").and_then(Value::as_u64);
        return match (of(regen).as_deref(), every) {
            (Some(CURRENT_POLICY), Some(k)) => {
                format!(
                    "on-policy: current policy, every {k} step{}",
                    if k == 1 { "" } else { "s" }
                )
            }
            // Lines without `every` keep the words the report gave them (its bytes).
            (Some(other), _) => other.replace('_', " "),
            (None, _) => "regenerated".into(),
        };
    }
    let Some(source) = of(safety) else {
        return "precomputed (input `safety`)".into();
    };
    let words: Vec<String> = source
        .split('+')
        .map(|s| match s {
            FIXED => "fixed targets".into(),
            REFERENCE_MODEL => "on-policy: reference model, sampled once".into(),
            MODEL_WITH_ADAPTER => "on-policy: the model with an adapter, sampled once".into(),
            other => other.replace('_', " "),
        })
        .collect();
    match words.len() {
        1 => words.into_iter().collect(),
        _ => format!("mixed: {}", words.join("; ")),
    }
}

const HEADER: [&str; 6] = [
    "training stage",
    "safety data from",
    "regenerated after RL steps",
    "answers generated",
    "answers kept",
    "safety SFT steps",
];

fn cells(r: &SafetyRun) -> [String; 6] {
    let regen = |v: u64| {
        if r.regeneration_steps.is_empty() {
            "-".to_string()
        } else {
            v.to_string()
        }
    };
    let steps: Vec<String> = r.regeneration_steps.iter().map(u64::to_string).collect();
    [
        r.stage.clone(),
        r.source.clone(),
        if steps.is_empty() {
            "-".into()
        } else {
            steps.join(", ")
        },
        regen(r.generated),
        regen(r.kept),
        r.safety_steps.to_string(),
    ]
}

/// The page's section (empty when no stage interleaved safety data).
pub fn html_section(metrics: &[MetricsFile]) -> String {
    let runs = safety_runs(metrics);
    if runs.is_empty() {
        return String::new();
    }
    let row = |tag: &str, cells: &mut dyn Iterator<Item = String>| {
        let mut s = String::from("<tr>");
        for c in cells {
            let _ = write!(s, "<{tag}>{}</{tag}>", esc(&c));
        }
        s + "</tr>"
    };
    let mut s = String::from(
        "<h2>Safety interleaving: where each arm's safety data came from</h2>\n<div class=\"wide\"><table>",
    );
    s.push_str(&row("th", &mut HEADER.iter().map(|h| h.to_string())));
    for r in &runs {
        s.push_str(&row("td", &mut cells(r).into_iter()));
    }
    s.push_str("</table></div>\n");
    s
}

/// The same table in Markdown (empty when no stage interleaved safety data).
pub fn markdown_section(metrics: &[MetricsFile]) -> String {
    let runs = safety_runs(metrics);
    if runs.is_empty() {
        return String::new();
    }
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    let mut s =
        String::from("\n## Safety interleaving: where each arm's safety data came from\n\n");
    s.push_str(&line(HEADER.iter().map(|h| h.to_string()).collect()));
    s.push_str(&line(HEADER.iter().map(|_| "---".to_string()).collect()));
    for r in &runs {
        s.push_str(&line(cells(r).to_vec()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(origin: &str, rows: Vec<Value>) -> MetricsFile {
        MetricsFile {
            origin: origin.into(),
            rows: rows
                .into_iter()
                .map(|r| r.as_object().unwrap().clone())
                .collect(),
        }
    }

    #[test]
    fn each_arm_says_where_its_safety_data_came_from() {
        let metrics = [
            file(
                "grpo[domain=medical,seed=0].metrics",
                vec![json!({"step": 0, "reward": 0.5})],
            ),
            file(
                "defence_fixed_safety[domain=medical,seed=0].metrics",
                vec![
                    json!({"step": 0, "reward": 0.5}),
                    json!({"step": 0, "batch": "safety", "source": "fixed", "loss": 1.0}),
                ],
            ),
            file(
                "defence_onpolicy_safety[domain=medical,seed=0].metrics",
                vec![
                    json!({"step": 0, "reward": 0.5}),
                    json!({"step": 0, "batch": "safety", "source": "reference_model", "loss": 1.0}),
                ],
            ),
            file(
                "defence_onpolicy_current[domain=medical,seed=0].metrics",
                vec![
                    json!({"step": 0, "reward": 0.5}),
                    json!({"step": 0, "batch": "regeneration", "source": "current_policy", "every": 2, "generated": 4, "kept": 3}),
                    json!({"step": 0, "batch": "safety", "source": "current_policy", "loss": 1.0}),
                    json!({"step": 2, "batch": "regeneration", "source": "current_policy", "every": 2, "generated": 4, "kept": 0}),
                    json!({"step": 2, "batch": "safety", "source": "current_policy", "loss": 1.0}),
                ],
            ),
        ];
        let runs = safety_runs(&metrics);
        assert_eq!(runs.len(), 3, "the arm without safety steps has no row");
        assert_eq!(runs[0].source, "fixed targets");
        assert_eq!(runs[1].source, "on-policy: reference model, sampled once");
        assert_eq!(
            runs[2],
            SafetyRun {
                stage: "defence_onpolicy_current[domain=medical,seed=0].metrics".into(),
                source: "on-policy: current policy, every 2 steps".into(),
                regeneration_steps: vec![0, 2],
                generated: 8,
                kept: 3,
                safety_steps: 2,
            }
        );
        let md = markdown_section(&metrics);
        assert!(md.contains("| defence_onpolicy_current[domain=medical,seed=0].metrics | on-policy: current policy, every 2 steps | 0, 2 | 8 | 3 | 2 |"), "{md}");
        assert!(
            md.contains("| on-policy: reference model, sampled once | - | - | - | 1 |"),
            "{md}"
        );
        assert!(html_section(&metrics).contains("<td>fixed targets</td>"));
        assert!(html_section(&metrics[..1]).is_empty());
    }

    #[test]
    fn mixed_and_old_metrics_are_named_as_they_are() {
        let safety = |source: Option<&str>| {
            let mut row = json!({"step": 0, "batch": "safety"});
            if let Some(s) = source {
                row["source"] = json!(s);
            }
            row.as_object().unwrap().clone()
        };
        let mixed = safety(Some("fixed+reference_model"));
        assert_eq!(
            source_label(None, Some(&mixed)),
            "mixed: fixed targets; on-policy: reference model, sampled once"
        );
        // Lines from before the `source` field: precomputed, as they were logged.
        assert_eq!(
            source_label(None, Some(&safety(None))),
            "precomputed (input `safety`)"
        );
        let old_regen = json!({"batch": "regeneration", "source": "current_policy"});
        assert_eq!(source_label(old_regen.as_object(), None), "current policy");
        let every_step = json!({"batch": "regeneration", "source": "current_policy", "every": 1});
        assert_eq!(
            source_label(every_step.as_object(), None),
            "on-policy: current policy, every 1 step"
        );
    }
}
