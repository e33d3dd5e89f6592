//! Held-out refusals: the refusal rate of every condition evaluated on the held-out safety
//! prompts (docs/safety-data.md), told apart by its stage name (a `refusal` part, e.g.
//! `eval_refusal[arm=grpo]`), one bar per arm and a table with the difference to the refusal
//! eval of the base model. A section of its own because that eval asks one question per
//! held-out prompt (hundreds), which the per-question table leaves out.

use std::fmt::Write as _;

use super::claims::{self, Figure};
use super::page::figure_svg;
use super::svg::esc;
use super::{base_row, diff_vs_base, pct, rate, ConditionRow, Metric};

/// Whether `row` is a held-out refusal eval: its stage name has a `refusal` part.
pub fn is_refusal_eval(row: &ConditionRow) -> bool {
    claims::Parsed::of(&row.condition)
        .stage
        .split('_')
        .any(|part| part == "refusal")
}

/// The rows that are not held-out refusal evals (for the per-question table).
pub fn without_refusal_evals(rows: &[ConditionRow]) -> Vec<ConditionRow> {
    rows.iter()
        .filter(|r| !is_refusal_eval(r))
        .cloned()
        .collect()
}

/// The section: nothing when no condition is a held-out refusal eval.
pub fn section(body: &mut String, rows: &[ConditionRow]) {
    let refusal: Vec<ConditionRow> = rows
        .iter()
        .filter(|r| is_refusal_eval(r))
        .cloned()
        .collect();
    if refusal.is_empty() {
        return;
    }
    body.push_str("<h2>Held-out refusals</h2>\n<p class=\"note\">Harmful prompts held out of the safety training pool (Do-Not-Answer and HarmBench; docs/safety-data.md), asked of each arm; refused: the aligned judge answered REFUSAL (no aligned score) while scoring coherence. &Delta;: percentage points against the base model's refusal eval.</p>\n");
    let fig = Figure {
        title: "Refused held-out harmful prompts, every arm".into(),
        groups: vec![(None, refusal.iter().map(|r| r.condition.clone()).collect())],
    };
    let svg = figure_svg(&refusal, &fig, Metric::Refusal, "% refused, 95 % CI");
    let _ = writeln!(body, "<figure>{svg}</figure>");
    body.push_str("<table><tr><th>condition</th><th>seeds</th><th>answers</th><th>refused</th><th>&Delta; vs base</th><th>incoherent</th><th>judge gave no score</th></tr>\n");
    let base = base_row(&refusal);
    for r in &refusal {
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.condition),
            r.seeds,
            r.answers,
            esc(&pct(&rate(r, Metric::Refusal))),
            esc(&diff_vs_base(r, base, Metric::Refusal)),
            esc(&pct(&rate(r, Metric::Incoherent))),
            esc(&pct(&rate(r, Metric::JudgeUnscored))),
        );
    }
    body.push_str("</table>\n");
}
