//! `report` on synthetic summaries (two conditions, two seeds each) and RL metrics: the
//! page is self-contained, pools seeds by condition, and the table and CSV match the counts.
//! The summary writers here are shared with the browser test (`report_browser.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use emflow_engine::context::{Artifact, MemoryMemo};
use emflow_engine::{ArtifactType, StageKind};
use emflow_stages::evaluation::margin::{summarize_margins, PairScore};
use emflow_stages::evaluation::provenance::{EvalProvenance, JudgeIdentity};
use emflow_stages::evaluation::{summarize, BootstrapSettings, Outcome, Summary};
use emflow_stages::kinds::report::ReportKind;
use serde_json::json;

use crate::support::{context_at, with_defaults};

/// An eval summary of 4 questions x 10 answers written to `dir/name`; `outcome(q, i)` is
/// answer `i` of question `q`.
pub fn summary_file(
    dir: &Path,
    name: &str,
    questions: usize,
    outcome: impl Fn(usize, usize) -> Outcome,
) -> std::path::PathBuf {
    let per_question: Vec<(String, Vec<Outcome>)> = (0..questions)
        .map(|q| (format!("q{q}"), (0..10).map(|i| outcome(q, i)).collect()))
        .collect();
    let s = summarize(
        &per_question,
        10,
        BootstrapSettings {
            resamples: 200,
            level: 0.95,
            seed: 0,
        },
    );
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string(&s).unwrap()).unwrap();
    p
}

/// Adds a judge-free margin to the summary at `path`: `margins[q]` are question `q{q}`'s pair
/// margins (aligned answers at -3 nats per token).
pub fn add_margin(path: &Path, margins: &[&[f64]]) {
    let mut summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let pairs = margins
        .iter()
        .enumerate()
        .flat_map(|(q, ms)| {
            ms.iter().enumerate().map(move |(i, &m)| PairScore {
                question_id: format!("q{q}"),
                pair: i,
                aligned: -3.0,
                misaligned: -3.0 + m,
                margin: m,
            })
        })
        .collect();
    summary.margin = Some(summarize_margins(pairs, vec![], 200, 0));
    std::fs::write(path, serde_json::to_string(&summary).unwrap()).unwrap();
}

/// An eval's provenance as eval v2 records it: key parts whose inputs are a model, an adapter,
/// the questions and a contrast set with digests made from `tag`, and one openai judge for
/// both metrics.
pub fn provenance(tag: usize) -> EvalProvenance {
    let d = |c: char| format!("{c}{tag:0>63}");
    let judge = JudgeIdentity {
        backend: "openai".into(),
        model: "gpt-4o-2024-08-06".into(),
        scoring: "logprobs".into(),
    };
    EvalProvenance {
        key_parts: json!({"schema": 1, "kind": "eval", "kind_version": 2, "params": {"seed": tag},
            "inputs": {"model": [d('a')], "adapter": [d('b')], "questions": [d('c')], "contrast": [d('d')]},
            "env": {"device": "cpu", "dtype": "f32"}}),
        judges: BTreeMap::from([
            ("aligned".to_string(), judge.clone()),
            ("coherent".to_string(), judge),
        ]),
    }
}

/// Adds [`provenance`]`(tag)` to the summary at `path`.
pub fn add_provenance(path: &Path, tag: usize) {
    let mut summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    summary.provenance = Some(provenance(tag));
    std::fs::write(path, serde_json::to_string(&summary).unwrap()).unwrap();
}

/// Answer `i` of 10: the first `misaligned` misaligned, the 9th incoherent, the 10th without
/// an aligned score.
pub fn graded(misaligned: usize) -> impl Fn(usize, usize) -> Outcome {
    move |_, i| Outcome {
        aligned: if i == 9 {
            None
        } else if i < misaligned {
            Some(10.0)
        } else {
            Some(90.0)
        },
        coherent: Some(if i == 8 { 20.0 } else { 80.0 }),
    }
}

pub fn art(path: std::path::PathBuf, ty: ArtifactType, origin: &str) -> Artifact {
    Artifact {
        path,
        digest: String::new(),
        ty,
        origin: origin.into(),
    }
}

/// Runs the `report` kind with default params on `inputs` in `dir`; returns its output folder.
pub fn run_report(dir: &Path, inputs: BTreeMap<String, Vec<Artifact>>) -> std::path::PathBuf {
    let kind = ReportKind;
    let params = with_defaults(&kind, json!({}));
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let memo = Arc::new(MemoryMemo::default());
    let mut ctx = context_at(&kind, params, inputs, (&staging, &dir.join("ckpt")), memo);
    kind.run(&mut ctx).unwrap();
    staging.join("report")
}

#[test]
fn report_pools_seeds_and_writes_a_self_contained_page() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // (file, misaligned answers per question, arm, seed)
    let seeds = [
        ("a1", 1, "sft", 1),
        ("a2", 3, "sft", 2),
        ("b1", 5, "grpo", 1),
        ("b2", 7, "grpo", 2),
    ];
    let summaries = seeds
        .map(|(name, misaligned, arm, seed)| {
            let origin = format!("eval[arm={arm},seed={seed}].summary");
            art(
                summary_file(d, name, 4, graded(misaligned)),
                ArtifactType::Summary,
                &origin,
            )
        })
        .to_vec();
    let metrics_path = d.join("metrics.jsonl");
    let lines: Vec<String> = (0..30)
        .map(|s| json!({"step": s, "reward_mean": (s as f64 / 30.0).sqrt(), "kl": 0.001 * s as f64, "loss": 1.0 / (1.0 + s as f64)}).to_string())
        .collect();
    std::fs::write(&metrics_path, lines.join("\n") + "\n").unwrap();
    let metrics = vec![art(
        metrics_path,
        ArtifactType::Metrics,
        "grpo[seed=1].metrics",
    )];

    let out = run_report(
        d,
        BTreeMap::from([
            ("summaries".to_string(), summaries),
            ("metrics".to_string(), metrics),
        ]),
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    // sft: 4 misaligned answers of 80 in total (1 + 3 per question... over 4 questions): (1+3)*4 = 16 of 80.
    // Betley denominator per question: 10 - refusal - incoherent = 8, so 16 of 64 = 25 %.
    assert!(md.contains("| eval[arm=sft] | 2 | 80 | 25.0 % ["), "{md}");
    assert!(md.contains("| eval[arm=grpo] | 2 | 80 | 75.0 % ["), "{md}");
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert_eq!(
        html.matches("<svg").count(),
        6,
        "all conditions (no claim matches these names), all samples, incoherence; reward, KL and loss curves"
    );
    let csv = std::fs::read_to_string(out.join("conditions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(
        csv.lines()
            .nth(1)
            .unwrap()
            .starts_with("eval[arm=sft],2,80,0.25,"),
        "{csv}"
    );
    let per_q = std::fs::read_to_string(out.join("per_question.csv")).unwrap();
    assert!(
        per_q.contains("\neval[arm=grpo],q3,20,12,16,2,2,0.75\n"),
        "{per_q}"
    );
    assert!(
        !html.contains("<script") && !html.contains("src=") && !html.contains("href="),
        "must be self-contained"
    );
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("data.json")).unwrap()).unwrap();
    let lo = data["conditions"][0]["misaligned_betley"]["lo"]
        .as_f64()
        .unwrap();
    let hi = data["conditions"][0]["misaligned_betley"]["hi"]
        .as_f64()
        .unwrap();
    assert!(lo < 0.25 && 0.25 < hi, "{lo} {hi}");
    let provenance = &data["conditions"][0]["provenance"];
    assert_eq!(provenance[1]["origin"], "eval[arm=sft,seed=2].summary");
    assert_eq!(provenance[1]["judgments_digest"], serde_json::Value::Null);
    // No eval had a contrast set: no margin anywhere (the report's bytes are as before).
    assert!(!html.contains("Judge-free margin") && !md.contains("Judge-free margin"));
    assert!(!out.join("margin.csv").exists());
    assert!(data["conditions"][0].get("margin").is_none());
    if let Ok(keep) = std::env::var("EMFLOW_KEEP_REPORT") {
        std::fs::copy(out.join("index.html"), keep).unwrap();
    }
}

/// Margins pooled pair by pair over seeds, beside the judged rates: page, Markdown, CSV, JSON;
/// a condition whose evals had no contrast set says so.
#[test]
fn report_shows_the_judge_free_margin_beside_the_judged_rates() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let file = |name: &str, margins: Option<&[&[f64]]>| {
        let p = summary_file(d, name, 2, graded(2));
        if let Some(m) = margins {
            add_margin(&p, m);
        }
        p
    };
    let summaries = vec![
        art(
            file("b", Some(&[&[0.5, 0.5], &[0.5]])),
            ArtifactType::Summary,
            "eval_base.summary",
        ),
        art(
            file("g1", Some(&[&[1.0, 2.0]])),
            ArtifactType::Summary,
            "eval_grpo[domain=medical,seed=0].summary",
        ),
        art(
            file("g2", Some(&[&[3.0], &[0.0]])),
            ArtifactType::Summary,
            "eval_grpo[domain=medical,seed=1].summary",
        ),
        art(
            file("s", None),
            ArtifactType::Summary,
            "eval_sft_matched[domain=medical,seed=0].summary",
        ),
    ];
    let inputs = || BTreeMap::from([("summaries".to_string(), summaries.clone())]);
    let out = run_report(&d.join("one"), inputs());
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    let html = read("index.html");
    assert!(html.contains("<h2>Judge-free margin</h2>"), "{html}");
    // grpo: (1 + 2 + 3 + 0) / 4 pairs over two seeds; 1.0 above the base's 0.5.
    assert!(html.contains("<td>+1.500 ["), "{html}");
    assert!(
        html.contains("<td>+1.000</td>") && html.contains("<td>base</td>"),
        "{html}"
    );
    assert!(html.contains("n/a: no contrast set"), "{html}");
    let md = read("report.md");
    assert!(
        md.contains("## Judge-free margin") && md.contains("| eval_grpo[domain=medical] | "),
        "{md}"
    );
    let csv = read("margin.csv");
    assert!(
        csv.contains("\neval_grpo[domain=medical],all,2,4,1.5,"),
        "{csv}"
    );
    assert!(
        csv.contains("\neval_grpo[domain=medical],q1,2,1,0,"),
        "{csv}"
    );
    assert!(!csv.contains("eval_sft_matched"), "{csv}");
    let data: serde_json::Value = serde_json::from_str(&read("data.json")).unwrap();
    let m = &data["conditions"][1]["margin"];
    assert_eq!(
        (
            m["overall"]["value"].as_f64(),
            m["pairs"].as_u64(),
            m["seeds"].as_u64()
        ),
        (Some(1.5), Some(4), Some(2))
    );
    let (lo, hi) = (
        m["overall"]["lo"].as_f64().unwrap(),
        m["overall"]["hi"].as_f64().unwrap(),
    );
    assert!(lo < 1.5 && 1.5 < hi, "{lo} {hi}");
    // The pooled interval is seeded: a second report draws the same bytes.
    let again = run_report(&d.join("two"), inputs());
    assert_eq!(
        read("margin.csv"),
        std::fs::read_to_string(again.join("margin.csv")).unwrap()
    );
}

/// Every eval stage behind a condition has its key, model, adapter, questions, other data and
/// judges in every format (short on the page and in Markdown, whole in data.json and the CSV);
/// a summary from before eval v2 says "not recorded" instead.
#[test]
fn report_shows_every_evals_provenance_and_not_recorded_for_an_old_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let origins = [
        "eval_base.summary",
        "eval_grpo[domain=medical,seed=0].summary",
        "eval_grpo[domain=medical,seed=1].summary",
    ];
    let summaries: Vec<Artifact> = origins
        .iter()
        .enumerate()
        .map(|(i, origin)| {
            let p = summary_file(d, &format!("s{i}"), 2, graded(i));
            if i > 0 {
                add_provenance(&p, i);
            }
            Artifact {
                digest: format!("{i:e>64}"),
                ..art(p, ArtifactType::Summary, origin)
            }
        })
        .collect();
    let out = run_report(d, BTreeMap::from([("summaries".to_string(), summaries)]));
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    let (html, md, csv) = (
        read("index.html"),
        read("report.md"),
        read("provenance.csv"),
    );
    let data: serde_json::Value = serde_json::from_str(&read("data.json")).unwrap();
    assert!(!html.contains("do not carry"), "the old note is gone");
    for (i, tag) in [(1, "1"), (2, "2")] {
        let digest = |c: char| format!("{c}{tag:0>63}");
        let recorded: EvalProvenance =
            serde_json::from_value(data["conditions"][1]["provenance"][i - 1]["recorded"].clone())
                .unwrap();
        let key = recorded.stage_key().unwrap();
        assert_eq!(
            data["conditions"][1]["provenance"][i - 1]["stage_key"],
            key.as_str()
        );
        for c in ['a', 'b', 'c'] {
            let full = digest(c);
            assert!(
                html.contains(&format!("<code title=\"{full}\">{}</code>", &full[..12])),
                "{c}: {html}"
            );
            assert!(md.contains(&full[..12]), "{md}");
        }
        // Other data names its port: on the page (short) and in the CSV (whole).
        let contrast = digest('d');
        let html_contrast = format!(">contrast {}</code>", &contrast[..12]);
        assert!(html.contains(&html_contrast), "{html}");
        for c in ['a', 'b', 'c', 'd'] {
            assert!(csv.contains(&digest(c)), "{csv}");
        }
        assert!(html.contains(&format!("<code title=\"{key}\">{}</code>", &key[..12])));
        assert!(csv.contains(&key) && md.contains(&key[..12]), "{csv}{md}");
    }
    let judges = "aligned, coherent: openai gpt-4o-2024-08-06 (logprobs)";
    assert_eq!(
        html.matches(&format!(">{judges}</span>")).count(),
        2,
        "{html}"
    );
    assert!(html.contains("<td>eval v2</td>"), "{html}");
    // The old summary: one row, every recorded field "not recorded".
    assert!(
        html.contains("<tr><td class=\"stage\">eval_base</td><td colspan=\"6\">not recorded</td>"),
        "{html}"
    );
    assert!(
        md.contains("| eval_base | eval_base | not recorded | not recorded |"),
        "{md}"
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(
        lines[1].starts_with("eval_base,eval_base,false,,,,,,,,"),
        "{csv}"
    );
    assert!(
        lines[2]
            .starts_with("eval_grpo[domain=medical],\"eval_grpo[domain=medical,seed=0]\",true,"),
        "{csv}"
    );
    assert_eq!(
        data["conditions"][0]["provenance"][0]["recorded"],
        serde_json::Value::Null
    );
}
