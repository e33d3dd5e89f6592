//! The report's numbers for programs and for a paper draft: `conditions.csv` and
//! `per_question.csv` (one row per condition, per condition and question), `data.json`
//! (everything, figures included) and `report.md` (the claims and the full table).

use std::fmt::Write as _;

use serde_json::json;

use super::answers::ConditionAnswers;
use super::claims::Figure;
use super::{base_row, markdown_table, pct, rate, ConditionRow, Metric};

const METRICS: [(Metric, &str); 6] = [
    (Metric::MisalignedBetley, "misaligned_betley"),
    (Metric::MisalignedAll, "misaligned_all"),
    (Metric::MisalignedAsRun, "misaligned_as_run"),
    (Metric::Incoherent, "incoherent"),
    (Metric::Refusal, "refusal"),
    (Metric::JudgeUnscored, "judge_unscored"),
];

/// A CSV field, quoted when it must be (RFC 4180).
pub(super) fn field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A number as a CSV field; empty for none.
pub(super) fn num(x: Option<f64>) -> String {
    x.map_or(String::new(), |v| format!("{v}"))
}

/// One row per condition: every rate as value, lo, hi and its reason when missing, the
/// difference to the base model, and the counts behind them.
pub fn conditions_csv(rows: &[ConditionRow]) -> String {
    let mut s = String::from("condition,seeds,answers");
    for (_, name) in METRICS {
        let _ = write!(
            s,
            ",{name},{name}_lo,{name}_hi,{name}_missing,{name}_diff_vs_base"
        );
    }
    s.push_str(
        ",mean_aligned,misaligned,betley_denominator,incoherent_answers,no_aligned_score,stages\n",
    );
    let base = base_row(rows);
    for r in rows {
        let _ = write!(s, "{},{},{}", field(&r.condition), r.seeds, r.answers);
        for (m, _) in METRICS {
            let x = rate(r, m);
            let (v, ci) = x.as_ref().map_or((None, None), |(v, ci)| (Some(*v), *ci));
            let diff = match (base.map(|b| rate(b, m)), v) {
                (Some(Ok((b, _))), Some(v)) => Some(v - b),
                _ => None,
            };
            let why = x.as_ref().err().map_or(String::new(), |w| field(w));
            let _ = write!(
                s,
                ",{},{},{},{why},{}",
                num(v),
                num(ci.map(|c| c.0)),
                num(ci.map(|c| c.1)),
                num(diff)
            );
        }
        let c = r.counts;
        let stages: Vec<&str> = r.provenance.iter().map(|p| p.origin.as_str()).collect();
        let _ = writeln!(
            s,
            ",{},{},{},{},{},{}",
            num(r.mean_aligned),
            c.misaligned,
            c.betley_denominator,
            c.incoherent,
            c.refusals,
            field(&stages.join(" "))
        );
    }
    s
}

/// One row per (condition, question): the pooled counts and the Betley rate.
pub fn per_question_csv(rows: &[ConditionRow]) -> String {
    let mut s = String::from("condition,question,answers,misaligned,betley_denominator,incoherent,no_aligned_score,misaligned_betley\n");
    for r in rows {
        for q in &r.questions {
            let c = q.counts;
            let rate = (c.betley_denominator > 0)
                .then(|| c.misaligned as f64 / c.betley_denominator as f64);
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{}",
                field(&r.condition),
                field(&q.id),
                c.n,
                c.misaligned,
                c.betley_denominator,
                c.incoherent,
                c.refusals,
                num(rate)
            );
        }
    }
    s
}

/// `data.json`: conditions (with provenance and per-question counts), the figures' groups,
/// the example answers, the versions, and the provenance of each eval over training
/// snapshots (`curve_provenance`: arm label and provenance).
pub fn data_json(
    rows: &[ConditionRow],
    figures: &[Figure],
    answers: &std::collections::BTreeMap<String, ConditionAnswers>,
    versions: &str,
    curves: &[(String, super::Provenance)],
) -> serde_json::Value {
    let curves: Vec<serde_json::Value> = curves
        .iter()
        .map(|(arm, p)| json!({"arm": arm, "provenance": p}))
        .collect();
    json!({
        "versions": versions,
        "base": base_row(rows).map(|b| b.condition.clone()),
        "conditions": rows,
        "figures": figures,
        "answers": answers,
        "curve_provenance": curves,
    })
}

/// `report.md`: one list per claim figure (Betley rate and Δ vs base), then the full table.
pub fn markdown(title: &str, rows: &[ConditionRow], figures: &[Figure], versions: &str) -> String {
    let mut s = format!("# {title}\n\n{versions}\n\n");
    let base = base_row(rows);
    for f in figures {
        let _ = writeln!(s, "## {}\n", f.title);
        for (heading, conds) in &f.groups {
            if let Some(h) = heading {
                let _ = writeln!(s, "- **{h}**");
            }
            for c in conds {
                let Some(r) = rows.iter().find(|r| &r.condition == c) else {
                    continue;
                };
                let d = super::diff_vs_base(r, base, Metric::MisalignedBetley);
                let d = if d.is_empty() || d == "base" {
                    String::new()
                } else {
                    format!(" ({d} vs base)")
                };
                let _ = writeln!(s, "  - {c}: {}{d}", pct(&rate(r, Metric::MisalignedBetley)));
            }
        }
        s.push('\n');
    }
    s.push_str("## All conditions\n\n");
    s.push_str(&markdown_table(rows));
    s
}
