//! Where every number of the report comes from: per condition, each eval stage it pools (and
//! each eval over training snapshots) with its stage key, the digests of the model, adapter
//! (or snapshots), questions and other data it read, the judge of each metric, and the digests
//! of its summary and judgments files. Drawn as a table on the page (in a `<details>`, one
//! heading row per condition so that long stage names wrap instead of widening the table), a
//! short table in `report.md`, `provenance.csv`, and in full in `data.json` (each condition's
//! `provenance`).
//!
//! The eval records its key's parts and judges in its summary
//! ([`crate::evaluation::provenance`]); a summary from before eval v2 has none and every
//! format says "not recorded" rather than guessing.

use std::fmt::Write as _;

use super::answers::stage_of;
use super::export::field;
use super::svg::esc;
use super::{ConditionRow, Provenance};
use crate::evaluation::provenance::{short_digest, EvalProvenance};

/// What the formats say for a summary that carries no provenance.
pub const NOT_RECORDED: &str = "not recorded";

/// One line of the provenance: a condition and one of the eval stages behind it.
pub struct Line<'a> {
    pub condition: &'a str,
    pub p: &'a Provenance,
}

/// Every line: each row's evals, then the curves' (condition label, provenance).
pub fn lines<'a>(rows: &'a [ConditionRow], curves: &'a [(String, Provenance)]) -> Vec<Line<'a>> {
    let evals = rows.iter().flat_map(|r| {
        r.provenance.iter().map(|p| Line {
            condition: &r.condition,
            p,
        })
    });
    let curves = curves.iter().map(|(c, p)| Line { condition: c, p });
    evals.chain(curves).collect()
}

/// The recorded facts of one eval, as text: full values (`full`) or short digests.
struct Facts {
    key: String,
    kind: String,
    model: String,
    adapter: String,
    questions: String,
    other: String,
    judges: String,
}

/// The ports shown in their own columns; every other port is listed under "other data".
/// `judge_model` is the local judge's model, which the judges column names.
const OWN_COLUMNS: [&str; 5] = ["model", "adapter", "snapshots", "questions", "judge_model"];

impl Facts {
    fn of(r: &EvalProvenance, full: bool) -> Facts {
        let d = |s: &str| {
            if full {
                s.to_string()
            } else {
                short_digest(s).to_string()
            }
        };
        let port = |name: &str| {
            r.input(name)
                .into_iter()
                .map(&d)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let adapter = match (port("adapter"), port("snapshots")) {
            (a, s) if a.is_empty() && s.is_empty() => "none (base model)".to_string(),
            (a, s) if s.is_empty() => a,
            (_, s) => format!("snapshots {s}"),
        };
        let other: Vec<String> = r
            .ports()
            .into_iter()
            .filter(|p| !OWN_COLUMNS.contains(p))
            .map(|p| format!("{p} {}", port(p)))
            .collect();
        Facts {
            key: r.stage_key().map_or_else(|| NOT_RECORDED.into(), |k| d(&k)),
            kind: r
                .kind_version()
                .map_or_else(|| NOT_RECORDED.into(), |v| format!("eval v{v}")),
            model: port("model"),
            adapter,
            questions: port("questions"),
            other: if other.is_empty() {
                "none".into()
            } else {
                other.join("; ")
            },
            judges: judges_text(r, full),
        }
    }
}

/// The judges, metrics that share one judge named together:
/// `aligned, coherent: openai gpt-4o (logprobs)`.
fn judges_text(r: &EvalProvenance, full: bool) -> String {
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for (metric, judge) in &r.judges {
        let who = judge.text(full);
        match groups.iter_mut().find(|(w, _)| *w == who) {
            Some((_, ms)) => ms.push(metric),
            None => groups.push((who, vec![metric])),
        }
    }
    let parts: Vec<String> = groups
        .into_iter()
        .map(|(who, ms)| format!("{}: {who}", ms.join(", ")))
        .collect();
    parts.join("; ")
}

/// A stage id for a narrow cell: a line may break after each `[` and `,`.
fn breakable(stage: &str) -> String {
    esc(stage).replace('[', "[<wbr>").replace(',', ",<wbr>")
}

/// `short` in a `tag` element whose tooltip is `full`.
fn with_tip(tag: &str, short: &str, full: &str) -> String {
    format!("<{tag} title=\"{}\">{}</{tag}>", esc(full), esc(short))
}

/// A digest as page code: the short form shown, the full one in the tooltip.
fn code(short: &str, full: &str) -> String {
    with_tip("code", short, full)
}

/// The columns of the page's table, after the stage's.
const HTML_COLUMNS: [&str; 9] = [
    "stage key",
    "model",
    "adapter",
    "questions",
    "other data",
    "judge per metric",
    "summary",
    "judgments",
    "kind",
];

/// The page's section.
pub fn html_section(lines: &[Line], versions: &str) -> String {
    let mut s = format!(
        "<h2>Provenance</h2>\n<details class=\"prov\"><summary>Where every number comes from ({})</summary>\n<p class=\"note\">Per condition, every eval stage it pools (the stage with its matrix values) with its stage key, the blake3 digests of what it read (model, adapter or training snapshots, questions, other data such as a contrast set), the judge of each metric, and the digests of its summary and judgments files. Digests and keys are cut to 12 characters: hover for the whole, or read <code>data.json</code> and <code>provenance.csv</code>; <code>emflow cache show STAGE</code> finds the stage's record. {NOT_RECORDED}: a summary from before eval v2.</p>\n<table class=\"prov\"><tr><th>stage</th>",
        esc(versions)
    );
    for c in HTML_COLUMNS {
        let _ = write!(s, "<th>{c}</th>");
    }
    s.push_str("</tr>\n");
    let mut last = None;
    for l in lines {
        if last != Some(l.condition) {
            let _ = writeln!(
                s,
                "<tr><th class=\"cond\" colspan=\"{}\">{}</th></tr>",
                HTML_COLUMNS.len() + 1,
                esc(l.condition)
            );
            last = Some(l.condition);
        }
        let facts =
            l.p.recorded
                .as_ref()
                .map(|r| (Facts::of(r, false), Facts::of(r, true)));
        let _ = write!(
            s,
            "<tr><td class=\"stage\">{}</td>",
            breakable(stage_of(&l.p.origin))
        );
        match &facts {
            Some((short, full)) => {
                let _ = write!(
                    s,
                    "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"wrap\">{}</td><td class=\"wrap\">{}</td>",
                    code(&short.key, &full.key),
                    code(&short.model, &full.model),
                    code(&short.adapter, &full.adapter),
                    code(&short.questions, &full.questions),
                    code(&short.other, &full.other),
                    with_tip("span", &short.judges, &full.judges)
                );
            }
            None => {
                let _ = write!(s, "<td colspan=\"6\">{NOT_RECORDED}</td>");
            }
        }
        let judgments = l.p.judgments_digest.as_deref().unwrap_or("not wired");
        let kind = facts.map_or_else(|| NOT_RECORDED.to_string(), |(_, full)| full.kind);
        let _ = writeln!(
            s,
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            code(short_digest(&l.p.summary_digest), &l.p.summary_digest),
            code(short_digest(judgments), judgments),
            esc(&kind)
        );
    }
    s.push_str("</table></details>\n");
    s
}

/// `report.md`'s short table: stage, key, model, adapter, questions and judges, short digests.
pub fn markdown(lines: &[Line]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n## Provenance\n\nDigests and keys cut to 12 characters; `data.json` and `provenance.csv` have them whole.\n\n| condition | stage | key | model | adapter | questions | judge per metric |\n|---|---|---|---|---|---|---|\n");
    for l in lines {
        let cells = match &l.p.recorded {
            Some(r) => {
                let f = Facts::of(r, false);
                [f.key, f.model, f.adapter, f.questions, f.judges]
            }
            None => std::array::from_fn(|_| NOT_RECORDED.to_string()),
        };
        let mut line = vec![l.condition.to_string(), stage_of(&l.p.origin).to_string()];
        line.extend(cells);
        let line: Vec<String> = line.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(s, "| {} |", line.join(" | "));
    }
    s
}

/// `provenance.csv`: one row per (condition, eval stage), full digests; `recorded` is false
/// (and the recorded fields empty) for a summary from before eval v2.
pub fn csv(lines: &[Line]) -> String {
    let mut s = String::from("condition,stage,recorded,stage_key,kind,model,adapter,questions,other_data,judges,summary_digest,judgments_digest\n");
    for l in lines {
        let f = l.p.recorded.as_ref().map(|r| Facts::of(r, true));
        let cells = match &f {
            Some(f) => [
                &f.key,
                &f.kind,
                &f.model,
                &f.adapter,
                &f.questions,
                &f.other,
                &f.judges,
            ]
            .map(|c| field(c)),
            None => std::array::from_fn(|_| String::new()),
        };
        let _ = writeln!(
            s,
            "{},{},{},{},{},{}",
            field(l.condition),
            field(stage_of(&l.p.origin)),
            f.is_some(),
            cells.join(","),
            field(&l.p.summary_digest),
            field(l.p.judgments_digest.as_deref().unwrap_or(""))
        );
    }
    s
}
