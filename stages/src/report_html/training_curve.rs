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
//! row, 1 the row of the eval of the arm's final adapter ([`final_eval`]: stage
//! `eval_snapshots_<family>[axes]` ends at `eval_<family>[axes]`, and an `arm` axis names the
//! family, `eval_snapshots[arm=grpo,domain=medical]` -> `eval_grpo[domain=medical]`), each
//! only when asked the same questions. A curve without them is drawn without them and the
//! table says so; a point without a rate (n/a) is left out, never drawn as 0.
//!
//! At the paper's ~20 RL and SFT arms one chart would repeat its colours and bury its lines,
//! so the figure is small multiples: one chart per question of the study ([`Panel`]), each
//! with at most a handful of curves on the same x axis.

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

/// The eval stage of a curve's final adapter and the axes it should carry: an `arm` axis
/// names the family (`eval_snapshots[arm=grpo,domain=medical]` -> `eval_grpo`, domain
/// medical), else the curve stage names it (`eval_snapshots_defences[defence=kl]` ->
/// `eval_defences`, defence kl). `None` for a curve stage not named `eval_snapshots...`.
pub fn final_eval(curve: &str) -> Option<(String, Vec<(String, String)>)> {
    let p = Parsed::of(curve);
    let family = p.stage.strip_prefix("eval_snapshots")?;
    let axes = |skip: &str| -> Vec<(String, String)> {
        let kept = p.axes.iter().filter(|(k, _)| *k != skip);
        kept.map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    match (p.axis("arm"), family.strip_prefix('_')) {
        (Some(arm), _) if family.is_empty() => Some((format!("eval_{arm}"), axes("arm"))),
        (None, Some(family)) if !family.is_empty() => Some((format!("eval_{family}"), axes(""))),
        _ => None,
    }
}

/// The row of the eval of `arm`'s final adapter ([`final_eval`]): the stage with the curve's
/// axes, else the row of that stage whose axes are the most of the curve's and no others
/// (`eval_defences[defence=kl]` for a curve with axes defence kl and domain medical).
fn final_row<'a>(arm: &str, rows: &'a [ConditionRow]) -> Option<&'a ConditionRow> {
    let (stage, axes) = final_eval(arm)?;
    let has = |k: &str, v: &str| axes.iter().any(|(a, b)| a == k && b == v);
    rows.iter()
        .filter_map(|r| {
            let p = Parsed::of(&r.condition);
            let fits = p.stage == stage && p.axes.iter().all(|(k, v)| has(k, v));
            fits.then_some((p.axes.len(), r))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, r)| r)
}

/// The legend's name of a curve: its final eval's stage without `eval_`, with the curve's
/// axes (`grpo[domain=medical]`, `defences[defence=kl,domain=medical]`).
fn short_name(arm: &str) -> String {
    let Some((stage, axes)) = final_eval(arm) else {
        return arm.to_string();
    };
    let stage = stage.strip_prefix("eval_").unwrap_or(&stage);
    let axes: Vec<String> = axes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    match axes.is_empty() {
        true => stage.to_string(),
        false => format!("{stage}[{}]", axes.join(",")),
    }
}

/// The charts of the figure, one per question of the study, in this order; a curve lands in
/// the first that takes it ([`Panel::of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Panel {
    /// RL against the sample-matched SFT arm: every `sft` curve, and the RL curves of the
    /// domains that have one.
    RlVsSft,
    /// Harmless rewards: RL curves of domains without an SFT curve.
    Harmless,
    /// Defences (a `defence` axis), beside the undefended RL curves of their domains.
    Defences,
    /// Cold start and control graders (`cold` / `control` in the arm's name).
    Controls,
    Other,
}

impl Panel {
    const ALL: [Panel; 5] = [
        Panel::RlVsSft,
        Panel::Harmless,
        Panel::Defences,
        Panel::Controls,
        Panel::Other,
    ];

    fn title(self) -> &'static str {
        match self {
            Panel::RlVsSft => "RL vs sample-matched SFT",
            Panel::Harmless => "harmless rewards",
            Panel::Defences => "defences",
            Panel::Controls => "cold start and control graders",
            Panel::Other => "other arms",
        }
    }

    /// The panels that draw curve `i` of `arms` (the defence panel repeats the undefended
    /// RL curve of the defences' domain, for comparison).
    fn of(i: usize, arms: &[ArmCurve]) -> Vec<Panel> {
        let facts: Vec<Facts> = arms.iter().map(|a| Facts::of(&a.label)).collect();
        let me = &facts[i];
        let same_domain = |what: &dyn Fn(&Facts) -> bool| {
            me.domain.is_some() && facts.iter().any(|o| o.domain == me.domain && what(o))
        };
        if me.defence {
            return vec![Panel::Defences];
        }
        if me.has("cold") || me.has("control") {
            return vec![Panel::Controls];
        }
        let first = if me.has("sft") || (me.is_rl() && same_domain(&|o| o.has("sft"))) {
            Panel::RlVsSft
        } else if me.is_rl() {
            Panel::Harmless
        } else {
            Panel::Other
        };
        let mut out = vec![first];
        if me.is_rl() && same_domain(&|o| o.defence) {
            out.push(Panel::Defences);
        }
        out
    }
}

/// What the panels read of a curve's label: its family's name split at `_`
/// (`eval_grpo_cold` -> eval, grpo, cold), its domain, whether it has a defence axis.
struct Facts {
    words: Vec<String>,
    domain: Option<String>,
    defence: bool,
}

impl Facts {
    fn of(label: &str) -> Facts {
        let p = Parsed::of(label);
        let family = final_eval(label).map_or_else(|| p.stage.to_string(), |(s, _)| s);
        Facts {
            words: family.split('_').map(str::to_string).collect(),
            domain: p.axis("domain").map(str::to_string),
            defence: p.axis("defence").is_some(),
        }
    }

    fn has(&self, word: &str) -> bool {
        self.words.iter().any(|w| w == word)
    }

    fn is_rl(&self) -> bool {
        !self.has("sft") && ["grpo", "rl", "ppo"].iter().any(|w| self.has(w))
    }
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

/// The figure (one chart per [`Panel`] that has a curve with points, all on the same axes)
/// and its table; empty when no curve has a point.
pub fn section(arms: &[ArmCurve], rows: &[ConditionRow]) -> String {
    if arms.iter().all(|a| a.points.is_empty()) {
        return String::new();
    }
    let mut out = String::from("<h2>Emergent misalignment over training</h2>\n");
    let drawn: Vec<(usize, Vec<Panel>, Line)> = (0..arms.len())
        .filter(|&i| !arms[i].points.is_empty())
        .map(|i| (i, Panel::of(i, arms), curve_line(&arms[i], rows)))
        .collect();
    // Small multiples compare by position: every chart spans 0..1 of a run and 0 to the
    // highest rate or interval end of any chart (1 % at least: a judge that scored nothing
    // leaves no rate, and the axis must still read as a rate, never below 0).
    let top = (drawn.iter())
        .flat_map(|(_, _, l)| {
            l.points
                .iter()
                .map(|p| p.1)
                .chain(l.whiskers.iter().map(|w| w.2))
        })
        .fold(1.0f64, f64::max);
    for panel in Panel::ALL {
        let members: Vec<(&ArmCurve, &Line)> = (drawn.iter())
            .filter(|(_, ps, _)| ps.contains(&panel))
            .map(|(i, _, l)| (&arms[*i], l))
            .collect();
        if !members.is_empty() {
            let svg = panel_chart(panel, &members, top);
            out.push_str(&format!("<figure>{svg}</figure>\n"));
        }
    }
    out.push_str(&table_html(arms, rows));
    out
}

/// One curve as drawn: (x, % misaligned) points and (x, lo, hi) whiskers of the 95 %
/// intervals, from 0 (base) to 1 (final adapter).
struct Line {
    points: Vec<(f64, f64)>,
    whiskers: Vec<(f64, f64, f64)>,
}

fn curve_line(arm: &ArmCurve, rows: &[ConditionRow]) -> Line {
    let mut line = Line {
        points: Vec::new(),
        whiskers: Vec::new(),
    };
    for (x, _, row) in full_curve(arm, rows) {
        if let Ok((v, interval)) = rate(row, Metric::MisalignedBetley) {
            line.points.push((x, v * 100.0));
            if let Some((lo, hi)) = interval {
                line.whiskers.push((x, lo * 100.0, hi * 100.0));
            }
        }
    }
    line
}

/// One panel's chart, its y axis from 0 to `top` % and its x axis over the whole run.
fn panel_chart(panel: Panel, members: &[(&ArmCurve, &Line)], top: f64) -> String {
    let series: Vec<(String, Vec<(f64, f64)>)> = (members.iter())
        .map(|(arm, line)| (short_name(&arm.label), line.points.clone()))
        .collect();
    let mut whiskers: Vec<Vec<(f64, f64, f64)>> =
        members.iter().map(|(_, l)| l.whiskers.clone()).collect();
    // Past the last series: not drawn, only the shared range.
    whiskers.push(vec![(0.0, 0.0, top), (1.0, 0.0, top)]);
    line_chart_with_intervals(
        &format!(
            "EM over training: {} (0 = base model, 1 = final adapter)",
            panel.title()
        ),
        (
            "share of the arm's training run (steps done / steps run)",
            "% misaligned (Betley), 95 % CI",
        ),
        &series,
        &whiskers,
    )
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

    fn axes(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Every curve stage of manifests/paper.yaml ends at its family's general eval.
    #[test]
    fn each_curve_stage_names_the_eval_of_its_final_adapter() {
        let cases = [
            (
                "eval_snapshots[arm=grpo,domain=medical]",
                "eval_grpo",
                vec![("domain", "medical")],
            ),
            (
                "eval_snapshots_grpo_cold[domain=legal]",
                "eval_grpo_cold",
                vec![("domain", "legal")],
            ),
            (
                "eval_snapshots_defences[defence=kl,domain=medical]",
                "eval_defences",
                vec![("defence", "kl"), ("domain", "medical")],
            ),
        ];
        for (curve, stage, want) in cases {
            assert_eq!(final_eval(curve), Some((stage.to_string(), axes(&want))));
        }
        assert_eq!(final_eval("eval_snapshots[domain=medical]"), None);
        assert_eq!(final_eval("eval_checkpoints[step=25]"), None);
        assert_eq!(
            short_name("eval_snapshots_defences[defence=kl,domain=medical]"),
            "defences[defence=kl,domain=medical]"
        );
    }

    /// The defence's final eval has no domain axis: the row with the most of the curve's
    /// axes (and no other) is the final point.
    #[test]
    fn a_final_eval_with_fewer_axes_is_found() {
        let none = crate::evaluation::Estimate {
            value: None,
            lo: None,
            hi: None,
        };
        let row = |c: &str| ConditionRow {
            condition: c.into(),
            seeds: 1,
            answers: 0,
            misaligned_betley: none,
            misaligned_all: none,
            incoherent: none,
            refusal: none,
            mean_aligned: None,
            counts: crate::evaluation::Counts::default(),
            judged: None,
            questions: Vec::new(),
            provenance: Vec::new(),
            margin: None,
        };
        let rows = [
            row("eval_defences[defence=ldifs]"),
            row("eval_defences[defence=kl]"),
            row("eval_grpo[domain=medical]"),
        ];
        let found = final_row("eval_snapshots_defences[defence=kl,domain=medical]", &rows);
        assert_eq!(
            found.map(|r| r.condition.as_str()),
            Some("eval_defences[defence=kl]")
        );
        assert!(final_row(
            "eval_snapshots_defences[defence=persona,domain=medical]",
            &rows
        )
        .is_none());
    }

    /// The paper's curves fall into one panel per question of the study, none over-full.
    #[test]
    fn the_papers_curves_fall_into_one_panel_per_question() {
        let mut labels: Vec<String> = Vec::new();
        for d in ["medical", "legal", "security", "aesthetic"] {
            labels.push(format!("eval_snapshots[arm=grpo,domain={d}]"));
        }
        for d in ["medical", "legal", "security"] {
            labels.push(format!("eval_snapshots[arm=sft_matched,domain={d}]"));
            labels.push(format!("eval_snapshots_grpo_cold[domain={d}]"));
        }
        labels.push("eval_snapshots_grpo_rhetoric[domain=argumentation]".into());
        labels.push("eval_snapshots_grpo_control_rhetoric[domain=argumentation]".into());
        for d in ["medical", "legal", "security", "aesthetic"] {
            labels.push(format!("eval_snapshots_grpo_control[domain={d}]"));
        }
        for d in [
            "kl",
            "ldifs",
            "fixed_safety",
            "onpolicy_safety",
            "inoculation",
            "onpolicy_current",
            "persona",
        ] {
            labels.push(format!(
                "eval_snapshots_defences[defence={d},domain=medical]"
            ));
        }
        let arms: Vec<ArmCurve> = labels
            .iter()
            .map(|l| ArmCurve {
                label: l.clone(),
                points: Vec::new(),
                not_reached: Vec::new(),
            })
            .collect();
        let in_panel = |panel: Panel| -> Vec<String> {
            (0..arms.len())
                .filter(|&i| Panel::of(i, &arms).contains(&panel))
                .map(|i| short_name(&arms[i].label))
                .collect()
        };
        let rl_sft = in_panel(Panel::RlVsSft);
        assert_eq!(rl_sft.len(), 6, "{rl_sft:?}");
        assert_eq!(
            in_panel(Panel::Harmless),
            [
                "grpo[domain=aesthetic]",
                "grpo_rhetoric[domain=argumentation]"
            ]
        );
        let defences = in_panel(Panel::Defences);
        assert_eq!(
            defences.len(),
            8,
            "seven defences and the undefended arm: {defences:?}"
        );
        assert!(defences.contains(&"grpo[domain=medical]".to_string()));
        assert_eq!(in_panel(Panel::Controls).len(), 8);
        assert!(in_panel(Panel::Other).is_empty());
        // Every panel fits the palette: no two curves of a chart share a colour.
        for panel in Panel::ALL {
            assert!(in_panel(panel).len() <= 10, "{panel:?}");
        }
    }
}
