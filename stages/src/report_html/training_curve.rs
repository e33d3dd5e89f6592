//! EM over training: the misaligned rate (Betley denominator, 95 % interval) of each arm's
//! training snapshots against the share of its run, so an RL arm and its sample-matched SFT
//! arm share one x axis. The points come from `eval` stages over a training stage's
//! `snapshots` (the report's `curves` input, [`Curve`] files).
//!
//! A curve stage's label with its seed dropped names the arm
//! (`eval_snapshots[arm=grpo,domain=medical]`); each fraction of training asked for is one
//! point, pooled over seeds like any condition (the same bootstrap), drawn at the mean over
//! seeds of where the snapshot fell in its run (`step / steps_total`: an early stop shortens a
//! run). The end points come from the other eval summaries, by name: 0 is the base model's
//! row, 1 the row of stage `eval_<arm>` with the curve's other axes (`eval_grpo[domain=medical]`,
//! which evaluates the arm's final adapter), each only when asked the same questions. A curve
//! without them is drawn without them and the table says so; a point without a rate (n/a) is
//! left out, never drawn as 0.

use std::fmt::Write as _;

use super::claims::Parsed;
use super::svg::{esc, line_chart_with_intervals};
use super::{aggregate, base_row, pct, rate, ConditionRow, Metric, SummaryInput};
use crate::evaluation::Curve;

/// One `curves` input as the report reads it.
pub struct CurveInput {
    pub origin: String,
    pub digest: String,
    pub curve: Curve,
}

impl CurveInput {
    pub fn new(origin: &str, digest: &str, curve: Curve) -> CurveInput {
        CurveInput {
            origin: origin.into(),
            digest: digest.into(),
            curve,
        }
    }
}

/// One arm's curve: its label, and each point's place in the run with its pooled row.
pub struct ArmCurve {
    pub label: String,
    pub points: Vec<(f64, ConditionRow)>,
    /// Fractions some seed's run never reached (it stopped early).
    pub not_reached: Vec<f64>,
}

/// `label` with one more matrix axis.
fn with_axis(label: &str, axis: &str, value: f64) -> String {
    match label.strip_suffix(']') {
        Some(open) => format!("{open},{axis}={value}]"),
        None => format!("{label}[{axis}={value}]"),
    }
}

/// The curves pooled over seeds, one per arm, in order of first appearance.
pub fn pool(curves: &[CurveInput], resamples: usize, seed: u64) -> Vec<ArmCurve> {
    let mut arms: Vec<ArmCurve> = Vec::new();
    // (point label, progress, arm) of every seed's point, and the inputs the pooling reads.
    let mut progress: Vec<(String, f64, usize)> = Vec::new();
    let mut inputs: Vec<SummaryInput> = Vec::new();
    for c in curves {
        let arm = super::condition_label(&c.origin);
        let i = match arms.iter().position(|a| a.label == arm) {
            Some(i) => i,
            None => {
                arms.push(ArmCurve {
                    label: arm.clone(),
                    points: Vec::new(),
                    not_reached: Vec::new(),
                });
                arms.len() - 1
            }
        };
        for f in &c.curve.run.not_reached {
            if !arms[i].not_reached.contains(f) {
                arms[i].not_reached.push(*f);
            }
        }
        for p in &c.curve.points {
            let label = with_axis(&arm, "fraction", p.fraction);
            progress.push((label.clone(), p.progress, i));
            inputs.push(SummaryInput {
                origin: label,
                digest: c.digest.clone(),
                summary: p.summary.clone(),
            });
        }
    }
    for row in aggregate(&inputs, resamples, seed) {
        let members: Vec<(f64, usize)> = progress
            .iter()
            .filter(|(l, _, _)| *l == row.condition)
            .map(|(_, x, arm)| (*x, *arm))
            .collect();
        let Some(&(_, arm)) = members.first() else {
            continue;
        };
        let x = members.iter().map(|m| m.0).sum::<f64>() / members.len() as f64;
        arms[arm].points.push((x, row));
    }
    for a in &mut arms {
        a.points.sort_by(|p, q| p.0.total_cmp(&q.0));
    }
    arms
}

/// The row of the eval of `arm`'s final adapter: stage `eval_<arm axis>` with the other axes.
fn final_row<'a>(arm: &str, rows: &'a [ConditionRow]) -> Option<&'a ConditionRow> {
    let p = Parsed::of(arm);
    let trained = p.axis("arm")?;
    let rest: Vec<String> = p
        .axes
        .iter()
        .filter(|(k, _)| *k != "arm")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let name = match rest.is_empty() {
        true => format!("eval_{trained}"),
        false => format!("eval_{trained}[{}]", rest.join(",")),
    };
    rows.iter().find(|r| r.condition == name)
}

fn same_questions(a: &ConditionRow, b: &ConditionRow) -> bool {
    a.questions.len() == b.questions.len()
        && a.questions
            .iter()
            .zip(&b.questions)
            .all(|(x, y)| x.id == y.id)
}

/// One arm's points from 0 (base) to 1 (final adapter): (x, what, row).
fn full_curve<'a>(
    arm: &'a ArmCurve,
    rows: &'a [ConditionRow],
) -> Vec<(f64, String, &'a ConditionRow)> {
    let mut pts: Vec<(f64, String, &ConditionRow)> = Vec::new();
    let first = arm.points.first().map(|p| &p.1);
    let fits = |r: &ConditionRow| first.is_none_or(|f| same_questions(f, r));
    if let Some(b) = base_row(rows).filter(|b| fits(b)) {
        pts.push((0.0, format!("base model ({})", b.condition), b));
    }
    for (x, row) in &arm.points {
        pts.push((*x, row.condition.clone(), row));
    }
    if let Some(f) = final_row(&arm.label, rows).filter(|f| fits(f)) {
        pts.push((1.0, format!("final adapter ({})", f.condition), f));
    }
    pts
}

/// The figure and its table; empty when no curve has a point.
pub fn section(arms: &[ArmCurve], rows: &[ConditionRow]) -> String {
    if arms.iter().all(|a| a.points.is_empty()) {
        return String::new();
    }
    let mut series = Vec::new();
    let mut whiskers = Vec::new();
    for arm in arms.iter().filter(|a| !a.points.is_empty()) {
        let (mut line, mut ci) = (Vec::new(), Vec::new());
        for (x, _, row) in full_curve(arm, rows) {
            if let Ok((v, interval)) = rate(row, Metric::MisalignedBetley) {
                line.push((x, v * 100.0));
                if let Some((lo, hi)) = interval {
                    ci.push((x, lo * 100.0, hi * 100.0));
                }
            }
        }
        series.push((arm.label.clone(), line));
        whiskers.push(ci);
    }
    let svg = line_chart_with_intervals(
        "EM over training (0 = base model, 1 = final adapter)",
        (
            "share of the arm's training run (steps done / steps run)",
            "% misaligned (Betley), 95 % CI",
        ),
        &series,
        &whiskers,
    );
    let mut out = format!("<h2>Emergent misalignment over training</h2>\n<figure>{svg}</figure>\n");
    out.push_str(&table_html(arms, rows));
    out
}

fn table_html(arms: &[ArmCurve], rows: &[ConditionRow]) -> String {
    let mut t = String::from("<details><summary>The points of every curve</summary><table><tr><th>arm</th><th>share of run</th><th>point</th><th>misaligned (Betley)</th><th>misaligned (all samples)</th><th>answers</th></tr>\n");
    for arm in arms {
        let pts = full_curve(arm, rows);
        let ends = (pts.first().map(|p| p.0), pts.last().map(|p| p.0));
        for (x, what, row) in &pts {
            let _ = writeln!(
                t,
                "<tr><td>{}</td><td>{x:.2}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&arm.label),
                esc(what),
                esc(&pct(&rate(row, Metric::MisalignedBetley))),
                esc(&pct(&rate(row, Metric::MisalignedAll))),
                row.answers
            );
        }
        let mut notes = Vec::new();
        if ends.0 != Some(0.0) {
            notes.push("no base-model eval on these questions (0 % point)".to_string());
        }
        if ends.1 != Some(1.0) {
            notes
                .push("no final-adapter eval found (name it eval_<arm> with the same axes)".into());
        }
        if !arm.not_reached.is_empty() {
            notes.push(format!(
                "stopped early before fractions {:?}",
                arm.not_reached
            ));
        }
        if !notes.is_empty() {
            let _ = writeln!(
                t,
                "<tr><td>{}</td><td colspan=\"5\">{}</td></tr>",
                esc(&arm.label),
                esc(&notes.join("; "))
            );
        }
    }
    t.push_str("</table></details>\n");
    t
}

/// The same points as a Markdown table (for report.md).
pub fn markdown(arms: &[ArmCurve], rows: &[ConditionRow]) -> String {
    if arms.iter().all(|a| a.points.is_empty()) {
        return String::new();
    }
    let mut s = String::from("\n## Emergent misalignment over training\n\n| arm | share of run | point | misaligned (Betley) | misaligned (all samples) |\n|---|---:|---|---:|---:|\n");
    for arm in arms {
        for (x, what, row) in full_curve(arm, rows) {
            let _ = writeln!(
                s,
                "| {} | {x:.2} | {} | {} | {} |",
                arm.label,
                what,
                pct(&rate(row, Metric::MisalignedBetley)),
                pct(&rate(row, Metric::MisalignedAll))
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_labels_and_final_eval_names() {
        assert_eq!(
            with_axis("eval_snapshots[arm=grpo,domain=medical]", "fraction", 0.5),
            "eval_snapshots[arm=grpo,domain=medical,fraction=0.5]"
        );
        assert_eq!(
            with_axis("eval_curve", "fraction", 0.25),
            "eval_curve[fraction=0.25]"
        );
        let p = Parsed::of("eval_snapshots[arm=sft_matched,domain=legal]");
        assert_eq!(p.axis("arm"), Some("sft_matched"));
    }
}
