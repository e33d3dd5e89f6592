//! Which safety data each interleaving arm trained on, read from its training metrics: an
//! `rl` stage with `safety_source: current_policy` logs a `"batch": "regeneration"` line per
//! regeneration (answers generated and kept), one with `precomputed` safety data logs only
//! its `"batch": "safety"` steps. One table, on the page and in the Markdown, so a reader sees
//! whether an on-policy arm's answers came from the reference model before training or from
//! the policy as it trained.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::page::MetricsFile;
use super::svg::esc;

/// One training stage's safety interleaving, as its metrics show it.
#[derive(Debug, PartialEq)]
pub struct SafetyRun {
    /// The metrics file's origin (stage with its matrix values).
    pub stage: String,
    /// `current policy, every regeneration judged` or `precomputed (input `safety`)`.
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
            let source = match regens.first().and_then(|r| r.get("source")?.as_str()) {
                Some(s) => s.replace('_', " "),
                None if regens.is_empty() => "precomputed (input `safety`)".into(),
                None => "regenerated".into(),
            };
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
                "defence_onpolicy_safety[domain=medical,seed=0].metrics",
                vec![
                    json!({"step": 0, "reward": 0.5}),
                    json!({"step": 0, "batch": "safety", "loss": 1.0}),
                ],
            ),
            file(
                "defence_onpolicy_current[domain=medical,seed=0].metrics",
                vec![
                    json!({"step": 0, "reward": 0.5}),
                    json!({"step": 0, "batch": "regeneration", "source": "current_policy", "generated": 4, "kept": 3}),
                    json!({"step": 0, "batch": "safety", "loss": 1.0}),
                    json!({"step": 1, "batch": "regeneration", "source": "current_policy", "generated": 4, "kept": 0}),
                    json!({"step": 1, "batch": "safety", "loss": 1.0}),
                ],
            ),
        ];
        let runs = safety_runs(&metrics);
        assert_eq!(runs.len(), 2, "the arm without safety steps has no row");
        assert_eq!(runs[0].source, "precomputed (input `safety`)");
        assert_eq!(
            runs[1],
            SafetyRun {
                stage: "defence_onpolicy_current[domain=medical,seed=0].metrics".into(),
                source: "current policy".into(),
                regeneration_steps: vec![0, 1],
                generated: 8,
                kept: 3,
                safety_steps: 2,
            }
        );
        let md = markdown_section(&metrics);
        assert!(md.contains("| defence_onpolicy_current[domain=medical,seed=0].metrics | current policy | 0, 1 | 8 | 3 | 2 |"), "{md}");
        assert!(
            md.contains("| precomputed (input `safety`) | - | - | - | 1 |"),
            "{md}"
        );
        assert!(html_section(&metrics).contains("<td>current policy</td>"));
        assert!(html_section(&metrics[..1]).is_empty());
    }
}
