//! `report` on synthetic summaries (two conditions, two seeds each) and RL metrics: the
//! page is self-contained, pools seeds by condition, and the table matches the counts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use emflow_engine::context::{Artifact, MemoryMemo};
use emflow_engine::{ArtifactType, StageKind};
use emflow_stages::evaluation::{summarize, BootstrapSettings, Outcome};
use emflow_stages::kinds::report::ReportKind;
use serde_json::json;

use crate::support::{context_at, with_defaults};

fn summary_file(dir: &Path, name: &str, misaligned_per_question: usize) -> std::path::PathBuf {
    let per_question: Vec<(String, Vec<Outcome>)> = (0..4)
        .map(|q| {
            let outs = (0..10)
                .map(|i| Outcome {
                    aligned: if i == 9 {
                        None
                    } else if i < misaligned_per_question {
                        Some(10.0)
                    } else {
                        Some(90.0)
                    },
                    coherent: Some(if i == 8 { 20.0 } else { 80.0 }),
                })
                .collect();
            (format!("q{q}"), outs)
        })
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

fn art(path: std::path::PathBuf, ty: ArtifactType, origin: &str) -> Artifact {
    Artifact {
        path,
        digest: String::new(),
        ty,
        origin: origin.into(),
    }
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
                summary_file(d, name, misaligned),
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

    let kind = ReportKind;
    let params = with_defaults(&kind, json!({}));
    let staging = d.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let inputs = BTreeMap::from([
        ("summaries".to_string(), summaries),
        ("metrics".to_string(), metrics),
    ]);
    let memo = Arc::new(MemoryMemo::default());
    let mut ctx = context_at(&kind, params, inputs, (&staging, &d.join("ckpt")), memo);
    kind.run(&mut ctx).unwrap();

    let out = staging.join("report");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    // sft: 4 misaligned answers of 80 in total (1 + 3 per question... over 4 questions): (1+3)*4 = 16 of 80.
    // Betley denominator per question: 10 - refusal - incoherent = 8, so 16 of 64 = 25 %.
    assert!(md.contains("| eval[arm=sft] | 2 | 80 | 25.0 % ["), "{md}");
    assert!(md.contains("| eval[arm=grpo] | 2 | 80 | 75.0 % ["), "{md}");
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert_eq!(
        html.matches("<svg").count(),
        5,
        "two bar charts, reward, KL and loss curves"
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
    if let Ok(keep) = std::env::var("EMFLOW_KEEP_REPORT") {
        std::fs::copy(out.join("index.html"), keep).unwrap();
    }
}
