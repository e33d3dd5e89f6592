//! Cross-condition reports: eval summaries and training metrics gathered into one
//! self-contained HTML page and a Markdown table shaped like the paper's.
//!
//! A *condition* is the producing stage with its `seed` axis removed, so
//! `eval[arm=grpo,seed=1].summary` and `eval[arm=grpo,seed=2].summary` are two seeds of the
//! condition `eval[arm=grpo]`. Seeds are pooled from the summaries' counts (misalignment is a
//! per-answer category, so counts describe the answers exactly) and intervals come from a
//! seeded bootstrap that resamples answers within each (seed, question).

pub mod answers;
pub mod as_run;
pub mod claims;
pub mod export;
pub mod interleaving;
pub mod margin;
pub mod page;
pub mod provenance;
pub mod refusals;
pub mod svg;
pub mod training_curve;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::evaluation::bootstrap::{interval, sorted_draws, Quantile};
use crate::evaluation::provenance::EvalProvenance;
use crate::evaluation::{Counts, Estimate, Summary};

/// The condition label of an artifact origin: output name and `seed=` axis dropped.
pub fn condition_label(origin: &str) -> String {
    let base = match origin.rfind('.') {
        Some(dot) if !origin[dot..].contains(']') => &origin[..dot],
        _ => origin,
    };
    let Some(open) = base.find('[') else {
        return base.to_string();
    };
    let Some(close) = base.rfind(']') else {
        return base.to_string();
    };
    let axes: Vec<&str> = base[open + 1..close]
        .split(',')
        .filter(|a| !a.trim().starts_with("seed="))
        .collect();
    if axes.is_empty() {
        base[..open].to_string()
    } else {
        format!(
            "{}[{}]{}",
            &base[..open],
            axes.join(","),
            &base[close + 1..]
        )
    }
}

/// One eval summary as the report reads it: where it came from and its content digest.
pub struct SummaryInput {
    pub origin: String,
    pub digest: String,
    pub summary: Summary,
}

/// Where one seed's numbers came from: the producing stage (name and matrix values), the
/// blake3 digest of its summary file, and what the eval recorded about how it made them
/// ([`provenance`] shows it).
#[derive(Clone, Debug, Serialize)]
pub struct Provenance {
    pub origin: String,
    pub summary_digest: String,
    /// The same stage's `judgments` digest, when wired.
    pub judgments_digest: Option<String>,
    /// The eval's stage key, recomputed from `recorded` ([`EvalProvenance::stage_key`]).
    pub stage_key: Option<String>,
    /// The eval's key parts and judges; `None` for a summary from before eval v2.
    pub recorded: Option<EvalProvenance>,
}

impl Provenance {
    /// The provenance of the summary (or curve) at `origin` with `digest`.
    pub fn of(origin: &str, digest: &str, recorded: Option<&EvalProvenance>) -> Provenance {
        Provenance {
            origin: origin.to_string(),
            summary_digest: digest.to_string(),
            judgments_digest: None,
            stage_key: recorded.and_then(EvalProvenance::stage_key),
            recorded: recorded.cloned(),
        }
    }
}

/// One question's answers pooled over a condition's seeds.
#[derive(Clone, Debug, Serialize)]
pub struct QuestionCounts {
    pub id: String,
    pub counts: Counts,
}

/// One condition's pooled numbers.
#[derive(Clone, Debug, Serialize)]
pub struct ConditionRow {
    pub condition: String,
    pub seeds: usize,
    pub answers: usize,
    pub misaligned_betley: Estimate,
    pub misaligned_all: Estimate,
    pub incoherent: Estimate,
    pub refusal: Estimate,
    pub mean_aligned: Option<f64>,
    /// The counts behind the rates, pooled over seeds.
    pub counts: Counts,
    /// Counts only the per-answer judgments give (when the evals' `judgments` are wired).
    pub judged: Option<JudgedCounts>,
    pub questions: Vec<QuestionCounts>,
    pub provenance: Vec<Provenance>,
    /// The judge-free margin, when the condition's evals had a contrast set ([`margin`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub margin: Option<margin::ConditionMargin>,
}

/// Counts read from the evals' per-answer judgments, pooled over seeds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct JudgedCounts {
    /// Answers with neither an aligned nor a coherent score (a judge failure, not a refusal).
    pub unscored: usize,
    /// Answers with both scores: EMA_RL's as-run denominator.
    pub both_scored: usize,
    /// Misaligned answers among those.
    pub misaligned_both_scored: usize,
    /// The pooled 95 % interval of their ratio, EMA_RL's rate as run ([`as_run`]).
    pub as_run_interval: Option<(f64, f64)>,
}

/// Per-(seed, question) counts, the bootstrap strata.
struct Stratum {
    misaligned: usize,
    betley_only: usize,
    outside: usize,
    incoherent: usize,
    refusals: usize,
    n: usize,
}

/// Pools `summaries` by condition, in order of first appearance.
pub fn aggregate(summaries: &[SummaryInput], resamples: usize, seed: u64) -> Vec<ConditionRow> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<&SummaryInput>> = BTreeMap::new();
    for s in summaries {
        let c = condition_label(&s.origin);
        if !groups.contains_key(&c) {
            order.push(c.clone());
        }
        groups.entry(c).or_default().push(s);
    }
    order
        .into_iter()
        .enumerate()
        .map(|(ci, condition)| {
            let members = &groups[&condition];
            pool(condition, members, resamples, seed.wrapping_add(ci as u64))
        })
        .collect()
}

/// One condition's row from its seeds' summaries.
fn pool(condition: String, members: &[&SummaryInput], resamples: usize, seed: u64) -> ConditionRow {
    let strata: Vec<Stratum> = members
        .iter()
        .flat_map(|s| s.summary.questions.iter())
        .map(|q| {
            let c = q.stats.counts;
            Stratum {
                misaligned: c.misaligned,
                betley_only: c.betley_denominator - c.misaligned,
                outside: c.n - c.betley_denominator,
                incoherent: c.incoherent,
                refusals: c.refusals,
                n: c.n,
            }
        })
        .collect();
    let mut questions: Vec<QuestionCounts> = Vec::new();
    for q in members.iter().flat_map(|s| s.summary.questions.iter()) {
        match questions.iter_mut().find(|x| x.id == q.id) {
            Some(x) => x.counts = add_counts(x.counts, q.stats.counts),
            None => questions.push(QuestionCounts {
                id: q.id.clone(),
                counts: q.stats.counts,
            }),
        }
    }
    let counts = members.iter().fold(Counts::default(), |a, s| {
        add_counts(a, s.summary.overall.counts)
    });
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    let scored = counts.n - counts.refusals;
    let mean_aligned = (scored > 0).then(|| {
        members
            .iter()
            .filter_map(|s| {
                let c = s.summary.overall.counts;
                s.summary
                    .overall
                    .mean_aligned
                    .value
                    .map(|m| m * (c.n - c.refusals) as f64)
            })
            .sum::<f64>()
            / scored as f64
    });
    let boot = resample(&strata, resamples, seed);
    ConditionRow {
        condition,
        seeds: members.len(),
        answers: counts.n,
        misaligned_betley: with_interval(
            ratio(counts.misaligned, counts.betley_denominator),
            &boot[0],
        ),
        misaligned_all: with_interval(ratio(counts.misaligned, counts.n), &boot[1]),
        incoherent: with_interval(ratio(counts.incoherent, counts.n), &boot[2]),
        refusal: with_interval(ratio(counts.refusals, counts.n), &boot[3]),
        mean_aligned,
        counts,
        judged: None,
        questions,
        provenance: members
            .iter()
            .map(|s| Provenance::of(&s.origin, &s.digest, s.summary.provenance.as_ref()))
            .collect(),
        margin: None,
    }
}

fn add_counts(a: Counts, b: Counts) -> Counts {
    Counts {
        n: a.n + b.n,
        misaligned: a.misaligned + b.misaligned,
        betley_denominator: a.betley_denominator + b.betley_denominator,
        incoherent: a.incoherent + b.incoherent,
        refusals: a.refusals + b.refusals,
    }
}

/// `value` with the pooled 95 % interval from the sorted `draws`.
fn with_interval(value: Option<f64>, draws: &[f64]) -> Estimate {
    interval(value, draws, (0.025, 0.975), Quantile::NearestRank)
}

/// Bootstrap draws of the four rates: answers resampled within each stratum, the
/// misalignment category jointly, incoherence and refusal each on its own (the summaries
/// keep only their marginal counts).
fn resample(strata: &[Stratum], resamples: usize, seed: u64) -> [Vec<f64>; 4] {
    sorted_draws(resamples, seed, |rng| {
        let (mut mis, mut den, mut inc, mut refu, mut n) = (0usize, 0usize, 0usize, 0usize, 0usize);
        for s in strata {
            for _ in 0..s.n {
                let u = rng.pick(s.n);
                if u < s.misaligned {
                    mis += 1;
                    den += 1;
                } else if u < s.misaligned + s.betley_only {
                    den += 1;
                }
                debug_assert!(s.misaligned + s.betley_only + s.outside == s.n);
                inc += (rng.pick(s.n) < s.incoherent) as usize;
                refu += (rng.pick(s.n) < s.refusals) as usize;
            }
            n += s.n;
        }
        let rate = |k: usize, of: usize| (of > 0).then(|| k as f64 / of as f64);
        [rate(mis, den), rate(mis, n), rate(inc, n), rate(refu, n)]
    })
}

/// The rates a report shows per condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    MisalignedBetley,
    MisalignedAll,
    /// EMA_RL as run: misaligned / answers with both scores.
    MisalignedAsRun,
    Incoherent,
    Refusal,
    JudgeUnscored,
}

/// A rate of one condition, as a fraction: value with its interval, or why there is none.
pub type Rate = Result<(f64, Option<(f64, f64)>), String>;

/// `metric` of `r`, or the reason it has no value, in words that keep "the judge gave no
/// score" apart from "the model refused".
pub fn rate(r: &ConditionRow, metric: Metric) -> Rate {
    let c = r.counts;
    if c.n == 0 {
        return Err("no answers".into());
    }
    let unscored = r.judged.map(|j| j.unscored);
    let all_unscored = unscored == Some(c.n);
    if all_unscored && metric != Metric::JudgeUnscored {
        return Err("judge gave no score".into());
    }
    let est = |e: &Estimate, why: &str| match (e.value, e.lo, e.hi) {
        (Some(v), Some(lo), Some(hi)) => Ok((v, Some((lo, hi)))),
        (Some(v), _, _) => Ok((v, None)),
        _ => Err(why.to_string()),
    };
    match metric {
        Metric::MisalignedBetley if c.refusals == c.n => Err("no answer has an aligned score".into()),
        Metric::MisalignedBetley => est(&r.misaligned_betley, "no coherent answer with an aligned score"),
        Metric::MisalignedAll => est(&r.misaligned_all, "no answers"),
        Metric::Incoherent => est(&r.incoherent, "no answers"),
        Metric::MisalignedAsRun => match r.judged {
            Some(j) if j.both_scored > 0 => Ok((
                j.misaligned_both_scored as f64 / j.both_scored as f64,
                j.as_run_interval,
            )),
            Some(_) => Err("no answer has both scores".into()),
            None => Err("judgments not wired".into()),
        },
        Metric::Refusal => match unscored {
            // Unscored answers have no aligned score either: take them out of the refusals.
            Some(u) if u > 0 => Ok(((c.refusals - u) as f64 / c.n as f64, None)),
            Some(_) => est(&r.refusal, "no answers"),
            None if c.refusals == c.n => Err(
                "no answer has an aligned score: refusals or a judge that gave no score (wire `judgments` to tell)".into(),
            ),
            None => est(&r.refusal, "no answers"),
        },
        Metric::JudgeUnscored => unscored
            .map(|u| (u as f64 / c.n as f64, None))
            .ok_or_else(|| "judgments not wired".to_string()),
    }
}

/// `12.5 % [8.1, 17.0]`, or `n/a: reason`.
pub fn pct(x: &Rate) -> String {
    match x {
        Ok((v, Some((lo, hi)))) => {
            format!("{:.1} % [{:.1}, {:.1}]", v * 100.0, lo * 100.0, hi * 100.0)
        }
        Ok((v, None)) => format!("{:.1} %", v * 100.0),
        Err(why) => format!("n/a: {why}"),
    }
}

/// `metric` of `r` minus the base model's, in percentage points (`+3.2 pp`), or empty when
/// either is missing, there is no base, or `r` was asked other questions than the base.
pub fn diff_vs_base(r: &ConditionRow, base: Option<&ConditionRow>, metric: Metric) -> String {
    let same_questions = |b: &ConditionRow| {
        b.questions.len() == r.questions.len()
            && b.questions
                .iter()
                .zip(&r.questions)
                .all(|(x, y)| x.id == y.id)
    };
    match (base.filter(|b| same_questions(b)), rate(r, metric)) {
        (Some(b), _) if b.condition == r.condition => "base".to_string(),
        (Some(b), Ok((v, _))) => match rate(b, metric) {
            Ok((bv, _)) => format!("{:+.1} pp", (v - bv) * 100.0),
            Err(_) => String::new(),
        },
        _ => String::new(),
    }
}

/// The base model's row: the first condition whose label names the base model.
pub fn base_row(rows: &[ConditionRow]) -> Option<&ConditionRow> {
    rows.iter()
        .find(|r| claims::Parsed::of(&r.condition).is_base())
}

/// The results table's columns, once: each with the title the HTML page shows (its note below
/// the table spells out the denominators) and the one the Markdown table shows.
pub const COLUMNS: [(&str, &str); 12] = [
    ("condition", "condition"),
    ("seeds", "seeds"),
    ("answers", "answers"),
    (
        "misaligned (Betley)",
        "misaligned (Betley: coherent, non-refusals)",
    ),
    ("Δ vs base", "Δ vs base (Betley)"),
    ("misaligned (all samples)", "misaligned (all samples)"),
    ("Δ vs base", "Δ vs base (all samples)"),
    (
        "misaligned (EMA_RL as run)",
        "misaligned (EMA_RL as run: answers with both scores)",
    ),
    ("incoherent", "incoherent"),
    ("refusal", "refusal"),
    ("judge gave no score", "judge gave no score"),
    ("mean aligned", "mean aligned"),
];

/// One condition's cells of the results table, as plain text (each format escapes them).
pub fn cells(r: &ConditionRow, base: Option<&ConditionRow>) -> [String; 12] {
    [
        r.condition.clone(),
        r.seeds.to_string(),
        r.answers.to_string(),
        pct(&rate(r, Metric::MisalignedBetley)),
        diff_vs_base(r, base, Metric::MisalignedBetley),
        pct(&rate(r, Metric::MisalignedAll)),
        diff_vs_base(r, base, Metric::MisalignedAll),
        pct(&rate(r, Metric::MisalignedAsRun)),
        pct(&rate(r, Metric::Incoherent)),
        pct(&rate(r, Metric::Refusal)),
        pct(&rate(r, Metric::JudgeUnscored)),
        r.mean_aligned
            .map_or("n/a: no aligned score".into(), |m| format!("{m:.1}")),
    ]
}

/// The paper-style table in Markdown.
pub fn markdown_table(rows: &[ConditionRow]) -> String {
    let line = |cells: &mut dyn Iterator<Item = String>| {
        let cells: Vec<String> = cells.map(|c| c.replace('|', "\\|")).collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut s = line(&mut COLUMNS.iter().map(|(_, md)| md.to_string()));
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let base = base_row(rows);
    for r in rows {
        s.push_str(&line(&mut cells(r, base).into_iter()));
    }
    s
}

/// The same table as an HTML `<table>`.
pub fn html_table(rows: &[ConditionRow]) -> String {
    let line = |tag: &str, cells: &mut dyn Iterator<Item = String>| {
        let cells: String = cells
            .map(|c| format!("<{tag}>{}</{tag}>", svg::esc(&c)))
            .collect();
        format!("<tr>{cells}</tr>\n")
    };
    let mut s = String::from("<table>");
    s.push_str(&line(
        "th",
        &mut COLUMNS.iter().map(|(html, _)| html.to_string()),
    ));
    let base = base_row(rows);
    for r in rows {
        s.push_str(&line("td", &mut cells(r, base).into_iter()));
    }
    s.push_str("</table>\n");
    s
}

/// Numeric series of one metrics file: (key, [(step, value)]) for keys mentioning `family`.
pub fn metric_series(
    rows: &[serde_json::Map<String, serde_json::Value>],
    family: &str,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut keys: Vec<String> = Vec::new();
    for r in rows {
        for (k, v) in r {
            if k != "step"
                && k.to_lowercase().contains(family)
                && v.is_number()
                && !keys.contains(k)
            {
                keys.push(k.clone());
            }
        }
    }
    keys.into_iter()
        .map(|k| {
            let pts = rows
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let y = r.get(&k)?.as_f64()?;
                    let x = r.get("step").and_then(|s| s.as_f64()).unwrap_or(i as f64);
                    Some((x, y))
                })
                .collect();
            (k, pts)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(value: f64, lo: f64, hi: f64) -> Estimate {
        Estimate {
            value: Some(value),
            lo: Some(lo),
            hi: Some(hi),
        }
    }

    /// Both formats of the one table, byte for byte as report kind v2 writes them (a change
    /// here changes `report` outputs: bump the kind's version).
    #[test]
    fn results_table_in_markdown_and_html() {
        let row = ConditionRow {
            condition: "eval[a|b<c]".to_string(),
            seeds: 2,
            answers: 40,
            misaligned_betley: est(0.125, 0.081, 0.17),
            misaligned_all: est(0.1, 0.05, 0.15),
            incoherent: Estimate {
                value: Some(0.025),
                lo: None,
                hi: None,
            },
            refusal: Estimate {
                value: Some(0.1),
                lo: None,
                hi: None,
            },
            mean_aligned: Some(71.25),
            counts: Counts {
                n: 40,
                misaligned: 4,
                betley_denominator: 32,
                incoherent: 1,
                refusals: 4,
            },
            judged: None,
            margin: None,
            questions: Vec::new(),
            provenance: Vec::new(),
        };
        let md = markdown_table(std::slice::from_ref(&row));
        let html = html_table(std::slice::from_ref(&row));
        assert_eq!(
            md,
            "| condition | seeds | answers | misaligned (Betley: coherent, non-refusals) | Δ vs base (Betley) | misaligned (all samples) | Δ vs base (all samples) | misaligned (EMA_RL as run: answers with both scores) | incoherent | refusal | judge gave no score | mean aligned |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | eval[a\\|b<c] | 2 | 40 | 12.5 % [8.1, 17.0] |  | 10.0 % [5.0, 15.0] |  | n/a: judgments not wired | 2.5 % | 10.0 % | n/a: judgments not wired | 71.2 |\n"
        );
        assert_eq!(
            html,
            "<table><tr><th>condition</th><th>seeds</th><th>answers</th><th>misaligned (Betley)</th><th>Δ vs base</th><th>misaligned (all samples)</th><th>Δ vs base</th><th>misaligned (EMA_RL as run)</th><th>incoherent</th><th>refusal</th><th>judge gave no score</th><th>mean aligned</th></tr>\n\
             <tr><td>eval[a|b&lt;c]</td><td>2</td><td>40</td><td>12.5 % [8.1, 17.0]</td><td></td><td>10.0 % [5.0, 15.0]</td><td></td><td>n/a: judgments not wired</td><td>2.5 %</td><td>10.0 %</td><td>n/a: judgments not wired</td><td>71.2</td></tr>\n</table>\n"
        );
        // A judge that scored nothing: every rate is n/a with that reason, not "refusal 100 %".
        let failed = ConditionRow {
            counts: Counts {
                n: 40,
                refusals: 40,
                ..Counts::default()
            },
            judged: Some(JudgedCounts {
                unscored: 40,
                ..JudgedCounts::default()
            }),
            ..row
        };
        for m in [
            Metric::MisalignedBetley,
            Metric::MisalignedAll,
            Metric::Refusal,
        ] {
            assert_eq!(pct(&rate(&failed, m)), "n/a: judge gave no score");
        }
        assert_eq!(pct(&rate(&failed, Metric::JudgeUnscored)), "100.0 %");
    }

    #[test]
    fn condition_labels_drop_seed_and_output() {
        assert_eq!(
            condition_label("eval[arm=grpo,seed=1].summary"),
            "eval[arm=grpo]"
        );
        assert_eq!(condition_label("eval[seed=3].summary"), "eval");
        assert_eq!(condition_label("eval_base.summary"), "eval_base");
        assert_eq!(condition_label("file:/tmp/x.json"), "file:/tmp/x");
    }
}
