//! The judge-free margin beside the judged rates: each condition's contrast margin
//! ([`crate::evaluation::margin`] defines it) pooled over its seeds, as a table on the page, a
//! section of `report.md`, `margin.csv`, and a field of each condition in `data.json`.
//!
//! Seeds are pooled pair by pair: the condition's margin is the mean over every scored pair of
//! every seed, and its interval resamples pairs within each (seed, question), on the stream
//! [`emflow_model::seed::Purpose::MarginBootstrap`] of the report's seed with the condition
//! (per question: the condition and the question) as scope. Conditions whose evals had no
//! contrast set have no margin and show "n/a".

use std::fmt::Write as _;

use serde::Serialize;

use super::export::{field, num};
use super::svg::{esc, text_width, FONT};
use super::{base_row, condition_label, pct, rate, ConditionRow, Metric, SummaryInput};
use crate::evaluation::margin::mean_with_interval;
use crate::evaluation::Estimate;

/// One condition's margin, seeds pooled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConditionMargin {
    /// Mean of `lp(misaligned) - lp(aligned)` over all pairs, nats per token, 95 % interval.
    pub overall: Estimate,
    pub pairs: usize,
    /// Seeds (eval summaries) with a margin.
    pub seeds: usize,
    pub questions: Vec<QuestionMarginPooled>,
}

/// One question's margin, seeds pooled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuestionMarginPooled {
    pub id: String,
    pub pairs: usize,
    pub margin: Estimate,
}

/// Sets each row's `margin` from the summaries of its condition that carry one.
pub fn attach(rows: &mut [ConditionRow], summaries: &[SummaryInput], resamples: usize, seed: u64) {
    for row in rows.iter_mut() {
        let members: Vec<_> = summaries
            .iter()
            .filter(|s| condition_label(&s.origin) == row.condition)
            .filter_map(|s| s.summary.margin.as_ref())
            .collect();
        if members.is_empty() {
            continue;
        }
        // Strata: one per (seed, question), in order of first appearance per question.
        let mut ids: Vec<&str> = Vec::new();
        let mut strata: Vec<(&str, Vec<f64>)> = Vec::new();
        for m in &members {
            for q in &m.questions {
                if !ids.contains(&q.id.as_str()) {
                    ids.push(&q.id);
                }
                let pairs = m.pair_scores.iter().filter(|p| p.question_id == q.id);
                strata.push((q.id.as_str(), pairs.map(|p| p.margin).collect()));
            }
        }
        let of = |id: &str| -> Vec<Vec<f64>> {
            strata
                .iter()
                .filter(|(q, _)| *q == id)
                .map(|(_, g)| g.clone())
                .collect()
        };
        let questions = ids
            .iter()
            .map(|id| {
                let groups = of(id);
                let scope = format!("{}\u{1f}{id}", row.condition);
                QuestionMarginPooled {
                    id: id.to_string(),
                    pairs: groups.iter().map(Vec::len).sum(),
                    margin: mean_with_interval(&groups, resamples, seed, &scope),
                }
            })
            .collect();
        let all: Vec<Vec<f64>> = strata.into_iter().map(|(_, g)| g).collect();
        row.margin = Some(ConditionMargin {
            overall: mean_with_interval(&all, resamples, seed, &row.condition),
            pairs: all.iter().map(Vec::len).sum(),
            seeds: members.len(),
            questions,
        });
    }
}

/// Whether any condition has a margin (the page, Markdown and CSV show it only then).
pub fn any(rows: &[ConditionRow]) -> bool {
    rows.iter().any(|r| r.margin.is_some())
}

/// A margin as text: value and interval in nats per token, or why there is none.
fn nats(e: Option<&Estimate>) -> String {
    match e.map(|e| (e.value, e.lo, e.hi)) {
        Some((Some(v), Some(lo), Some(hi))) => format!("{v:+.3} [{lo:+.3}, {hi:+.3}]"),
        Some((Some(v), _, _)) => format!("{v:+.3}"),
        // Wired, but none of its questions has contrast answers (in-domain, refusal evals).
        Some((None, _, _)) => "n/a: no contrast answers for its questions".into(),
        None => "n/a: no contrast set".into(),
    }
}

/// The difference of `r`'s margin to the base model's, when both have one.
fn diff_vs_base(r: &ConditionRow, base: Option<&ConditionRow>) -> String {
    let value = |r: &ConditionRow| r.margin.as_ref().and_then(|m| m.overall.value);
    match base {
        Some(b) if b.condition == r.condition => "base".into(),
        Some(b) => match (value(r), value(b)) {
            (Some(v), Some(bv)) => format!("{:+.3}", v - bv),
            _ => String::new(),
        },
        None => String::new(),
    }
}

/// Headers of the margin table, with the judged rates it stands beside.
const HEADERS: [&str; 6] = [
    "condition",
    "misaligned (Betley)",
    "misaligned (all samples)",
    "judge-free margin",
    "Δ margin vs base",
    "pairs",
];

fn cells(r: &ConditionRow, base: Option<&ConditionRow>) -> [String; 6] {
    let m = r.margin.as_ref();
    [
        r.condition.clone(),
        pct(&rate(r, Metric::MisalignedBetley)),
        pct(&rate(r, Metric::MisalignedAll)),
        nats(m.map(|m| &m.overall)),
        diff_vs_base(r, base),
        m.map_or(String::new(), |m| m.pairs.to_string()),
    ]
}

const NOTE: &str = "Judge-free margin: the mean over contrast pairs (a fixed aligned and a fixed misaligned answer to the same question, written by the project) of the misaligned answer's mean log-probability per token minus the aligned one's, under each condition's model at temperature 1, in nats per token; above 0, the model finds the misaligned answer more likely. Brackets: 95 % bootstrap intervals over pairs, resampled within each seed and question. Compare with the base model's margin: it needs no judge, so it reads the same on a machine whose judge scores nothing.";

/// The page's section: a chart of every condition's margin and the table beside the judged
/// rates.
pub fn html_section(rows: &[ConditionRow]) -> String {
    if !any(rows) {
        return String::new();
    }
    let base = base_row(rows);
    let mut s = String::from("<h2>Judge-free margin</h2>\n");
    let _ = writeln!(s, "<figure>{}</figure>", chart(rows));
    s.push_str("<div class=\"wide\"><table class=\"margin\"><tr>");
    for h in HEADERS {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr>\n");
    for r in rows {
        s.push_str("<tr>");
        for c in cells(r, base) {
            let _ = write!(s, "<td>{}</td>", esc(&c));
        }
        s.push_str("</tr>\n");
    }
    let _ = writeln!(s, "</table></div>\n<p class=\"note\">{}</p>", esc(NOTE));
    s
}

/// The `report.md` section (empty without margins).
pub fn markdown(rows: &[ConditionRow]) -> String {
    if !any(rows) {
        return String::new();
    }
    let base = base_row(rows);
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut s = String::from("\n## Judge-free margin\n\n");
    s.push_str(&line(&HEADERS.map(String::from)));
    s.push_str("|---|---:|---:|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&line(&cells(r, base)));
    }
    let _ = writeln!(s, "\n{NOTE}");
    s
}

/// `margin.csv`: per condition one row for all questions (`question` = `all`), then one per
/// question; numbers in nats per token.
pub fn csv(rows: &[ConditionRow]) -> String {
    let mut s = String::from("condition,question,seeds,pairs,margin,margin_lo,margin_hi\n");
    for r in rows {
        let Some(m) = &r.margin else { continue };
        let all = std::iter::once(("all", m.pairs, &m.overall));
        let each = m
            .questions
            .iter()
            .map(|q| (q.id.as_str(), q.pairs, &q.margin));
        for (q, pairs, e) in all.chain(each) {
            let _ = writeln!(
                s,
                "{},{},{},{pairs},{},{},{}",
                field(&r.condition),
                field(q),
                m.seeds,
                num(e.value),
                num(e.lo),
                num(e.hi)
            );
        }
    }
    s
}

/// Chart geometry, px.
const PLOT_W: f64 = 300.0;
const ROW_H: f64 = 20.0;
const PAD: f64 = 10.0;
const TITLE: &str = "Judge-free margin by condition";
const X_LABEL: &str = "log p(misaligned) - log p(aligned), nats per token, 95 % CI";

/// A dot-and-whisker chart on a signed axis symmetric about 0 (a bar chart starts at 0 and
/// cannot show a negative margin): one row per condition, its value and interval printed
/// right of the plot, "n/a: reason" where it has none. Sized to its text like `svg.rs`'s.
fn chart(rows: &[ConditionRow]) -> String {
    let label_w = rows
        .iter()
        .map(|r| text_width(&r.condition, FONT))
        .fold(40.0, f64::max);
    let left = PAD + label_w + 8.0;
    let notes: Vec<String> = rows
        .iter()
        .map(|r| nats(r.margin.as_ref().map(|m| &m.overall)))
        .collect();
    let note_w = notes
        .iter()
        .map(|n| text_width(n, FONT))
        .fold(0.0, f64::max);
    let width = (left + PLOT_W + 8.0 + note_w + PAD)
        .max(PAD * 2.0 + text_width(TITLE, 14.0))
        .max(left + PLOT_W / 2.0 + text_width(X_LABEL, FONT) / 2.0 + PAD)
        .ceil();
    let top = 32.0;
    let bottom = top + rows.len() as f64 * ROW_H;
    let height = (bottom + 44.0).ceil();
    let extent = rows
        .iter()
        .filter_map(|r| r.margin.as_ref())
        .flat_map(|m| [m.overall.value, m.overall.lo, m.overall.hi])
        .flatten()
        .fold(0.05f64, |a, v| a.max(v.abs()))
        * 1.1;
    let x = |v: f64| left + (v.clamp(-extent, extent) + extent) / (2.0 * extent) * PLOT_W;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="sans-serif" font-size="{FONT}" role="img"><title>{TITLE}</title><rect width="{width}" height="{height}" fill="white"/><text x="{PAD}" y="20" font-size="14" font-weight="bold">{TITLE}</text>"#
    );
    for (v, anchor) in [(-extent, "start"), (0.0, "middle"), (extent, "end")] {
        let _ = write!(
            out,
            r##"<line x1="{p:.1}" x2="{p:.1}" y1="{top}" y2="{bottom}" stroke="{c}"/><text x="{p:.1}" y="{ty}" text-anchor="{anchor}">{v:+.2}</text>"##,
            p = x(v),
            c = if v == 0.0 { "#333" } else { "#e4e4e4" },
            ty = bottom + 14.0
        );
    }
    let _ = write!(
        out,
        r#"<text x="{cx:.1}" y="{ty}" text-anchor="middle">{xl}</text>"#,
        cx = left + PLOT_W / 2.0,
        ty = bottom + 32.0,
        xl = esc(X_LABEL)
    );
    for (i, (r, note)) in rows.iter().zip(&notes).enumerate() {
        let (y, ty) = (top + i as f64 * ROW_H, top + i as f64 * ROW_H + 14.0);
        let _ = write!(
            out,
            r#"<text class="arm" x="{lx:.1}" y="{ty}" text-anchor="end">{label}</text>"#,
            lx = left - 8.0,
            label = esc(&r.condition)
        );
        let e = r.margin.as_ref().map(|m| m.overall);
        if let Some(Estimate {
            value: Some(v),
            lo,
            hi,
        }) = e
        {
            if let (Some(lo), Some(hi)) = (lo, hi) {
                let _ = write!(
                    out,
                    r##"<path d="M{a:.1} {m}H{z:.1}" stroke="#222" stroke-width="1.3"/>"##,
                    a = x(lo),
                    z = x(hi),
                    m = y + 10.0
                );
            }
            let _ = write!(
                out,
                r##"<circle cx="{cx:.1}" cy="{cy}" r="4" fill="#e15759"/>"##,
                cx = x(v),
                cy = y + 10.0
            );
            let _ = write!(
                out,
                r#"<text class="note" x="{nx:.1}" y="{ty}">{t}</text>"#,
                nx = left + PLOT_W + 8.0,
                t = esc(note)
            );
        } else {
            let _ = write!(
                out,
                r##"<text class="na" x="{nx:.1}" y="{ty}" fill="#777" font-style="italic">{t}</text>"##,
                nx = left + 4.0,
                t = esc(note)
            );
        }
    }
    out.push_str("</svg>");
    out
}
