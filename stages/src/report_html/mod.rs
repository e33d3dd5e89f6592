//! Cross-condition reports: eval summaries and training metrics gathered into one
//! self-contained HTML page and a Markdown table shaped like the paper's.
//!
//! A *condition* is the producing stage with its `seed` axis removed, so
//! `eval[arm=grpo,seed=1].summary` and `eval[arm=grpo,seed=2].summary` are two seeds of the
//! condition `eval[arm=grpo]`. Seeds are pooled from the summaries' counts (misalignment is a
//! per-answer category, so counts describe the answers exactly) and intervals come from a
//! seeded bootstrap that resamples answers within each (seed, question).

pub mod svg;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::evaluation::bootstrap::{interval, sorted_draws, Quantile};
use crate::evaluation::{Estimate, Summary};

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

/// Pools `summaries` (each with its origin) by condition, in order of first appearance.
pub fn aggregate(
    summaries: &[(String, Summary)],
    resamples: usize,
    seed: u64,
) -> Vec<ConditionRow> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<&Summary>> = BTreeMap::new();
    for (origin, s) in summaries {
        let c = condition_label(origin);
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
            let strata: Vec<Stratum> = members
                .iter()
                .flat_map(|s| s.questions.iter())
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
            let tot = |f: &dyn Fn(&Stratum) -> usize| strata.iter().map(f).sum::<usize>();
            let (n, mis, den) = (
                tot(&|s| s.n),
                tot(&|s| s.misaligned),
                tot(&|s| s.misaligned + s.betley_only),
            );
            let (inc, refu) = (tot(&|s| s.incoherent), tot(&|s| s.refusals));
            let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
            let scored: f64 = members
                .iter()
                .map(|s| (s.overall.counts.n - s.overall.counts.refusals) as f64)
                .sum();
            let mean_aligned = (scored > 0.0).then(|| {
                members
                    .iter()
                    .filter_map(|s| {
                        s.overall
                            .mean_aligned
                            .value
                            .map(|m| m * (s.overall.counts.n - s.overall.counts.refusals) as f64)
                    })
                    .sum::<f64>()
                    / scored
            });
            let boot = resample(&strata, resamples, seed.wrapping_add(ci as u64));
            ConditionRow {
                condition,
                seeds: members.len(),
                answers: n,
                misaligned_betley: with_interval(ratio(mis, den), &boot[0]),
                misaligned_all: with_interval(ratio(mis, n), &boot[1]),
                incoherent: with_interval(ratio(inc, n), &boot[2]),
                refusal: with_interval(ratio(refu, n), &boot[3]),
                mean_aligned,
            }
        })
        .collect()
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

/// `12.5 % [8.1, 17.0]`, or `n/a`.
pub fn pct(e: &Estimate) -> String {
    match (e.value, e.lo, e.hi) {
        (Some(v), Some(lo), Some(hi)) => {
            format!("{:.1} % [{:.1}, {:.1}]", v * 100.0, lo * 100.0, hi * 100.0)
        }
        (Some(v), _, _) => format!("{:.1} %", v * 100.0),
        _ => "n/a".to_string(),
    }
}

/// The results table's columns, once: each with the title the HTML page shows (its note below
/// the table spells out the denominators) and the one the Markdown table shows.
const COLUMNS: [(&str, &str); 8] = [
    ("condition", "condition"),
    ("seeds", "seeds"),
    ("answers", "answers"),
    (
        "misaligned (Betley)",
        "misaligned (Betley: coherent, non-refusals)",
    ),
    ("misaligned (all samples)", "misaligned (all samples)"),
    ("incoherent", "incoherent"),
    ("refusal", "refusal"),
    ("mean aligned", "mean aligned"),
];

/// One condition's cells of the results table, as plain text (each format escapes them).
fn cells(r: &ConditionRow) -> [String; 8] {
    [
        r.condition.clone(),
        r.seeds.to_string(),
        r.answers.to_string(),
        pct(&r.misaligned_betley),
        pct(&r.misaligned_all),
        pct(&r.incoherent),
        pct(&r.refusal),
        r.mean_aligned.map_or("n/a".into(), |m| format!("{m:.1}")),
    ]
}

/// The paper-style table in Markdown.
pub fn markdown_table(rows: &[ConditionRow]) -> String {
    let line = |cells: &mut dyn Iterator<Item = String>| {
        let cells: Vec<String> = cells.map(|c| c.replace('|', "\\|")).collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut s = line(&mut COLUMNS.iter().map(|(_, md)| md.to_string()));
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&line(&mut cells(r).into_iter()));
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
    for r in rows {
        s.push_str(&line("td", &mut cells(r).into_iter()));
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

    /// Both formats of the one table, byte for byte as the report kind has always written
    /// them (a change here changes `report` outputs).
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
                value: None,
                lo: None,
                hi: None,
            },
            mean_aligned: Some(71.25),
        };
        assert_eq!(
            markdown_table(std::slice::from_ref(&row)),
            "| condition | seeds | answers | misaligned (Betley: coherent, non-refusals) | misaligned (all samples) | incoherent | refusal | mean aligned |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n\
             | eval[a\\|b<c] | 2 | 40 | 12.5 % [8.1, 17.0] | 10.0 % [5.0, 15.0] | 2.5 % | n/a | 71.2 |\n"
        );
        assert_eq!(
            html_table(&[row]),
            "<table><tr><th>condition</th><th>seeds</th><th>answers</th><th>misaligned (Betley)</th><th>misaligned (all samples)</th><th>incoherent</th><th>refusal</th><th>mean aligned</th></tr>\n\
             <tr><td>eval[a|b&lt;c]</td><td>2</td><td>40</td><td>12.5 % [8.1, 17.0]</td><td>10.0 % [5.0, 15.0]</td><td>2.5 %</td><td>n/a</td><td>71.2</td></tr>\n</table>\n"
        );
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
