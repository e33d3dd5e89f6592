//! The report in a real browser: a page built by the `report` kind from 33 synthetic arms
//! (the paper manifest's condition names, long labels, a judge that scored nothing) is loaded
//! in headless Chromium, where an injected script measures every text box of every SVG. The
//! page must have no overlapping text boxes within a figure, no label outside its SVG's
//! viewport, and every arm drawn; its judge-free margin table must list every arm, with a
//! margin beside the judged rates for every general eval. A deliberately broken page shows
//! the measurement catches both faults.
//!
//! Needs Debian's `chromium` (or `EMFLOW_CHROMIUM=/path`); without it the test is skipped
//! with the reason printed, and fails when `EMFLOW_REQUIRE_TEST_ASSETS=1` (CI installs it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use emflow_engine::context::Artifact;
use emflow_engine::ArtifactType;
use emflow_stages::evaluation::{Curve, CurvePoint, Outcome};
use emflow_stages::train::snapshots::SnapshotIndex;
use serde_json::{json, Value};

use crate::report_html::{
    add_margin, add_provenance, art, graded, provenance, run_report, summary_file,
};

/// Measures every `<text>` of every `<svg>` after layout and writes the findings into the
/// DOM as JSON, for `--dump-dom` to carry out. Boxes are client rectangles (transforms
/// applied); a box counts as clipped when it leaves its SVG's box by more than half a pixel,
/// and two boxes overlap when they share more than half a pixel in both directions.
const MEASURE: &str = r#"<script>
(function () {
  const out = { svgs: 0, texts: 0, clipped: [], overlaps: [], figures: [] };
  // The provenance table, unfolded: its rows, and every cell whose text overflows the cell or
  // whose box reaches past the page's column.
  document.querySelectorAll('details.prov').forEach(function (d) { d.open = true; });
  const column = document.body.getBoundingClientRect().right;
  out.prov_rows = Array.from(document.querySelectorAll('table.prov tr')).map(function (tr) {
    return Array.from(tr.children).map(function (c) { return c.textContent; });
  });
  out.prov_overflow = [];
  document.querySelectorAll('table.prov td, table.prov th').forEach(function (c) {
    const r = c.getBoundingClientRect();
    if (c.scrollWidth > c.clientWidth + 1 || r.right > column + 0.5) {
      out.prov_overflow.push(c.textContent + ' [' + Math.round(r.left) + ', ' + Math.round(r.right) + '] in ' + Math.round(column));
    }
  });
  document.querySelectorAll('svg').forEach(function (svg, si) {
    out.svgs += 1;
    const t = svg.querySelector('title');
    const title = t ? t.textContent : 'svg ' + si;
    const box = svg.getBoundingClientRect();
    const boxes = [];
    svg.querySelectorAll('text').forEach(function (el) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 || r.height === 0) return;
      out.texts += 1;
      boxes.push({ text: el.textContent, r: r });
      if (r.left < box.left - 0.5 || r.right > box.right + 0.5 ||
          r.top < box.top - 0.5 || r.bottom > box.bottom + 0.5) {
        out.clipped.push(title + ': "' + el.textContent + '" [' + Math.round(r.left) + ', ' +
          Math.round(r.right) + '] in [' + Math.round(box.left) + ', ' + Math.round(box.right) + ']');
      }
    });
    for (let i = 0; i < boxes.length; i++) {
      for (let j = i + 1; j < boxes.length; j++) {
        const a = boxes[i].r, b = boxes[j].r;
        const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
        const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
        if (w > 0.5 && h > 0.5) {
          out.overlaps.push(title + ': "' + boxes[i].text + '" and "' + boxes[j].text + '"');
        }
      }
    }
    const arms = Array.from(svg.querySelectorAll('text.arm')).map(function (e) { return e.textContent; });
    out.figures.push({ title: title, width: box.width, height: box.height, arms: arms });
  });
  out.margin_rows = Array.from(document.querySelectorAll('table.margin tr')).map(function (tr) {
    return Array.from(tr.children).map(function (c) { return c.textContent; });
  });
  const pre = document.createElement('pre');
  pre.id = 'emflow-findings';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"#;

/// The browser, or `None` (skipped; a failure in CI) with the reason printed.
fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("EMFLOW_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            if dir.join(name).is_file() {
                return Some(dir.join(name));
            }
        }
    }
    emflow_model::testing::skip(
        "chromium (the report's browser test)",
        "not on PATH; install it with `apt-get install -y chromium` or set EMFLOW_CHROMIUM",
    )
}

/// Loads `html` (with [`MEASURE`] injected) in headless Chromium; returns the findings.
fn measure(browser: &Path, html: &str, dir: &Path) -> Value {
    let page = dir.join("measured.html");
    std::fs::write(&page, html.replace("</body>", &format!("{MEASURE}</body>"))).unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .args(["--disable-dev-shm-usage", "--window-size=1400,1000"])
        .arg("--virtual-time-budget=2000")
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("running chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    let start = dom.find("<pre id=\"emflow-findings\">").unwrap_or_else(|| {
        panic!(
            "chromium wrote no findings (status {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    }) + "<pre id=\"emflow-findings\">".len();
    let end = start + dom[start..].find("</pre>").unwrap();
    let text = dom[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&");
    serde_json::from_str(&text).unwrap()
}

/// The paper manifest's conditions, more domains and defences, and three checkpoint evals:
/// 33 arms (conditions), two seeds for some; `eval_grpo[domain=finance]` is an arm whose judge scored nothing.
fn arm_origins() -> Vec<String> {
    let mut arms = vec!["eval_base.summary".to_string()];
    let domains = ["medical", "legal", "security", "aesthetic", "finance"];
    for stage in ["eval_warmup", "eval_grpo"] {
        arms.extend(domains.map(|d| format!("{stage}[domain={d},seed=0].summary")));
    }
    arms.push("eval_grpo_rhetoric[domain=argumentation,seed=0].summary".into());
    for d in ["medical", "legal", "security"] {
        for seed in [0, 1] {
            arms.push(format!("eval_sft_matched[domain={d},seed={seed}].summary"));
        }
    }
    let defences = [
        "kl",
        "ldifs",
        "fixed_safety",
        "onpolicy_safety",
        "inoculation",
        "onpolicy_safety_interleaved_every_fourth_step_with_a_long_name",
        "kl_and_inoculation",
        "ldifs_strong",
        "fixed_safety_half",
        "kl_strong",
    ];
    arms.extend(defences.map(|d| format!("eval_defences[defence={d},seed=0].summary")));
    arms.extend(domains.map(|d| format!("eval_in_domain[domain={d},seed=0].summary")));
    for step in [25, 50, 75] {
        arms.push(format!(
            "eval_checkpoints[domain=medical,step={step},seed=0].summary"
        ));
    }
    arms
}

/// `a` with its file's digest, as the engine wires it (the provenance table shows it).
fn with_digest(a: Artifact) -> Artifact {
    Artifact {
        digest: crate::support::digest(&a.path),
        ..a
    }
}

/// The one summary written before eval v2, without provenance.
const OLD_SUMMARY: &str = "eval_checkpoints[domain=medical,step=25,";

/// Summaries (and, for two arms, judgments and samples) of every arm and a few training
/// metrics files, as the kind's inputs.
fn inputs(d: &Path) -> BTreeMap<String, Vec<Artifact>> {
    let mut summaries = Vec::new();
    for (i, origin) in arm_origins().iter().enumerate() {
        let name = format!("s{i}.json");
        let in_domain = origin.starts_with("eval_in_domain");
        let path = if origin.starts_with("eval_grpo[domain=finance") {
            summary_file(d, &name, 8, |_, _| Outcome {
                aligned: None,
                coherent: None,
            })
        } else {
            summary_file(d, &name, if in_domain { 3 } else { 8 }, graded(i % 8))
        };
        // Every general arm has a judge-free margin (the finance arm's judge scored nothing,
        // the margin needs none); in-domain evals have no contrast set.
        if !in_domain {
            let m = i as f64 / 10.0 - 1.0;
            add_margin(&path, &[&[m, m + 0.5], &[m - 0.25]]);
        }
        // Every eval records its provenance but one from before eval v2.
        if !origin.contains(OLD_SUMMARY) {
            add_provenance(&path, i);
        }
        summaries.push(with_digest(art(path, ArtifactType::Summary, origin)));
    }
    let (mut judgments, mut samples) = (Vec::new(), Vec::new());
    for (stage, score) in [
        ("eval_grpo[domain=finance,seed=0]", None),
        ("eval_grpo[domain=medical,seed=0]", Some(12.0)),
    ] {
        // Every answer of the summary: 8 questions x 10 samples.
        let answers = || (0..8).flat_map(|q| (0..10).map(move |i| (q, i)));
        let j: Vec<String> = answers()
            .map(|(q, i)| json!({"question_id": format!("q{q}"), "sample": i, "aligned": score.map(|s: f64| s + (q * 10 + i) as f64), "coherent": score.map(|_| 80.0)}).to_string())
            .collect();
        let s: Vec<String> = answers()
            .map(|(q, i)| json!({"question_id": format!("q{q}"), "sample": i, "paraphrase": 0, "question": format!("Question {q}?"), "completion": format!("Answer <{q}.{i}> & more"), "finish": "stop", "tokens": 5}).to_string())
            .collect();
        let (jp, sp) = (d.join(format!("{stage}.j")), d.join(format!("{stage}.s")));
        std::fs::write(&jp, j.join("\n") + "\n").unwrap();
        std::fs::write(&sp, s.join("\n") + "\n").unwrap();
        judgments.push(with_digest(art(
            jp,
            ArtifactType::Judgments,
            &format!("{stage}.judgments"),
        )));
        samples.push(art(sp, ArtifactType::Samples, &format!("{stage}.samples")));
    }
    // Training curves of several stages, seeds and domains: the legends must wrap, not clip.
    let mut metrics = Vec::new();
    for (k, origin) in [
        "grpo[domain=medical,seed=0]",
        "grpo[domain=medical,seed=1]",
        "grpo[domain=aesthetic,seed=0]",
        "defence_onpolicy_safety[domain=medical,seed=0]",
        "sft_matched[domain=legal,seed=0]",
    ]
    .iter()
    .enumerate()
    {
        let rows: Vec<String> = (0..20)
            .map(|s| json!({"step": s, "reward_mean": (s * (k + 1)) as f64 / 20.0, "reward_std": 0.1, "kl": 1e-4 * s as f64, "loss": 2.0 / (1.0 + s as f64)}).to_string())
            .collect();
        let p = d.join(format!("m{k}.jsonl"));
        std::fs::write(&p, rows.join("\n") + "\n").unwrap();
        metrics.push(art(p, ArtifactType::Metrics, &format!("{origin}.metrics")));
    }
    BTreeMap::from([
        ("summaries".to_string(), summaries),
        ("metrics".to_string(), metrics),
        ("judgments".to_string(), judgments),
        ("samples".to_string(), samples),
        ("curves".to_string(), curves(d)),
    ])
}

/// EM over training: the medical GRPO arm and its matched SFT arm, two seeds each, three
/// snapshots a run; one GRPO seed stopped early, before its last snapshot. Beside them the
/// curves of other RL families as manifests/paper.yaml names them: two defences and a
/// cold-start arm.
fn curves(d: &Path) -> Vec<Artifact> {
    let mut out = Vec::new();
    for (arm, seed) in [
        ("grpo", 0),
        ("grpo", 1),
        ("sft_matched", 0),
        ("sft_matched", 1),
        ("defences:kl", 0),
        (
            "defences:onpolicy_safety_interleaved_every_fourth_step_with_a_long_name",
            0,
        ),
        ("grpo_cold", 0),
    ] {
        let stopped = arm == "grpo" && seed == 1;
        let fractions: &[f64] = if stopped {
            &[0.25, 0.5]
        } else {
            &[0.25, 0.5, 0.75]
        };
        let points: Vec<CurvePoint> = fractions
            .iter()
            .enumerate()
            .map(|(k, f)| {
                let name = format!("curve-{arm}-{seed}-{k}.json");
                let path = summary_file(d, &name, 8, graded(1 + 2 * k + seed));
                let summary =
                    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
                let step = (f * 100.0) as u64;
                CurvePoint {
                    fraction: *f,
                    step,
                    samples_consumed: 4 * step,
                    progress: step as f64 / if stopped { 60.0 } else { 100.0 },
                    summary,
                }
            })
            .collect();
        let run = SnapshotIndex {
            schema: "emflow.snapshots/1".into(),
            steps_total: if stopped { 60 } else { 100 },
            snapshots: Vec::new(),
            not_reached: if stopped { vec![0.75] } else { Vec::new() },
        };
        let curve = Curve {
            provenance: Some(provenance(100 + out.len())),
            ..Curve::new(run, points)
        };
        let p = d.join(format!("curve-{arm}-{seed}.json"));
        std::fs::write(&p, serde_json::to_string(&curve).unwrap()).unwrap();
        let origin = match arm.split_once(':') {
            Some((family, defence)) => format!(
                "eval_snapshots_{family}[defence={defence},domain=medical,seed={seed}].summary"
            ),
            None if arm == "grpo_cold" => {
                format!("eval_snapshots_grpo_cold[domain=medical,seed={seed}].summary")
            }
            None => format!("eval_snapshots[arm={arm},domain=medical,seed={seed}].summary"),
        };
        out.push(with_digest(art(p, ArtifactType::Summary, &origin)));
    }
    out
}

#[test]
fn report_at_thirty_three_arms_has_no_clipped_or_overlapping_text_in_a_browser() {
    let Some(browser) = chromium() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = run_report(tmp.path(), inputs(tmp.path()));
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="));
    let found = measure(&browser, &html, tmp.path());
    eprintln!(
        "browser findings at 33 arms: {} SVGs, {} text boxes",
        found["svgs"], found["texts"]
    );
    for f in found["figures"].as_array().unwrap() {
        eprintln!(
            "  {} ({}x{} px, {} arms)",
            f["title"],
            f["width"],
            f["height"],
            f["arms"].as_array().unwrap().len()
        );
    }
    assert!(found["texts"].as_u64().unwrap() > 100, "{found}");
    assert_eq!(found["clipped"], json!([]), "labels outside their SVG");
    assert_eq!(found["overlaps"], json!([]), "overlapping text boxes");
    let mut conditions: Vec<String> = Vec::new();
    for o in arm_origins() {
        let c = emflow_stages::report_html::condition_label(&o);
        if !conditions.contains(&c) {
            conditions.push(c);
        }
    }
    assert_eq!(conditions.len(), 33);
    let figures = found["figures"].as_array().unwrap();
    let drawn = |f: &Value| -> Vec<String> {
        f["arms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let every = figures
        .iter()
        .find(|f| f["title"].as_str().unwrap().contains("every condition"))
        .expect("a figure of every condition");
    assert_eq!(
        drawn(every),
        conditions,
        "every arm, in order, in the all-conditions figure"
    );
    let claims: Vec<String> = figures
        .iter()
        .take_while(|f| f != &every)
        .flat_map(drawn)
        .collect();
    for c in &conditions {
        assert!(claims.contains(c), "{c} is in no claim figure");
    }
    assert!(
        html.contains("n/a: judge gave no score"),
        "the failed judge is n/a, not 100 % refusal"
    );
    assert!(figures
        .iter()
        .any(|f| f["title"] == "EM over training (checkpoint evals)"));
    // ... and the early stop noted.
    snapshot_charts_show_every_curve(figures, &html);
    assert!(html.contains("base model (eval_base)"));
    assert!(html.contains("stopped early before fractions [0.75]"));
    margin_table_has_every_arm(&found, &conditions);
    provenance_table_has_every_stage(&found, &conditions);
    let margin_chart = figures
        .iter()
        .find(|f| f["title"] == "Judge-free margin by condition")
        .expect("a judge-free margin chart");
    assert_eq!(
        drawn(margin_chart),
        conditions,
        "every arm in the margin chart"
    );
    if let Ok(keep) = std::env::var("EMFLOW_KEEP_REPORT") {
        std::fs::copy(out.join("index.html"), keep).unwrap();
    }
}

/// The snapshot curves: one chart per question of the study, each arm in its legend, from
/// the base model (0) to the final adapters' evals (1).
fn snapshot_charts_show_every_curve(figures: &[Value], html: &str) {
    let chart = |panel: &str| {
        let title = format!("EM over training: {panel} (0 = base model, 1 = final adapter)");
        figures
            .iter()
            .find(|f| f["title"] == title.as_str())
            .unwrap_or_else(|| panic!("no chart `{title}`"))
    };
    let curve = chart("RL vs sample-matched SFT");
    assert!(curve["width"].as_f64().unwrap() >= 700.0, "{curve}");
    chart("defences");
    chart("cold start and control graders");
    for arm in [
        "grpo[domain=medical]",
        "sft_matched[domain=medical]",
        "defences[defence=kl,domain=medical]",
        "grpo_cold[domain=medical]",
    ] {
        assert!(
            html.contains(&format!(">{arm}</text>")),
            "{arm} in the legend"
        );
    }
    assert!(html.contains("final adapter (eval_sft_matched[domain=medical])"));
    assert!(html.contains("final adapter (eval_defences[defence=kl])"));
}

/// The judge-free margin as the browser lays it out: a column beside the judged rates, one
/// row per arm in order, a value for every general arm (the one whose judge scored nothing
/// included) and "n/a" for the in-domain evals, which had no contrast set.
fn margin_table_has_every_arm(found: &Value, conditions: &[String]) {
    let rows: Vec<Vec<String>> = serde_json::from_value(found["margin_rows"].clone()).unwrap();
    let header = &rows[0];
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no `{name}` column: {header:?}"))
    };
    let (margin, judged) = (col("judge-free margin"), col("misaligned (all samples)"));
    assert!(
        margin > judged,
        "the margin stands beside the judged rates: {header:?}"
    );
    let arms: Vec<&String> = rows[1..].iter().map(|r| &r[0]).collect();
    assert_eq!(
        arms,
        conditions.iter().collect::<Vec<_>>(),
        "every arm, in order"
    );
    for r in &rows[1..] {
        let in_domain = r[0].starts_with("eval_in_domain");
        assert_eq!(r[margin].starts_with("n/a"), in_domain, "{r:?}");
    }
    let finance = rows
        .iter()
        .find(|r| r[0] == "eval_grpo[domain=finance]")
        .unwrap();
    assert!(
        finance[judged].starts_with("n/a") && !finance[margin].starts_with("n/a"),
        "{finance:?}"
    );
}

/// The provenance table as the browser lays it out, unfolded: a heading per condition (the
/// snapshot curves' arms last), under it one row per eval stage with every field filled, the
/// old summary's "not recorded"; no cell's text overflows and no cell reaches past the page.
fn provenance_table_has_every_stage(found: &Value, conditions: &[String]) {
    assert_eq!(
        found["prov_overflow"],
        json!([]),
        "clipped provenance cells"
    );
    let rows: Vec<Vec<String>> = serde_json::from_value(found["prov_rows"].clone()).unwrap();
    let header = &rows[0];
    assert_eq!(header.len(), 10, "{header:?}");
    let mut headings: Vec<String> = Vec::new();
    let mut stages = 0;
    for r in &rows[1..] {
        match r.len() {
            1 => headings.push(r[0].clone()),
            _ if r[0].contains(OLD_SUMMARY) => {
                assert_eq!(r.len(), 5, "{r:?}");
                assert_eq!(r[1], "not recorded");
                stages += 1;
            }
            n => {
                assert_eq!(n, header.len(), "{r:?}");
                for (h, cell) in header.iter().zip(r) {
                    assert!(!cell.is_empty() && cell != "not recorded", "{h} of {r:?}");
                }
                assert!(r[6].contains("aligned, coherent: openai"), "{r:?}");
                stages += 1;
            }
        }
    }
    // The curves of `curves()`, seeds pooled (7 curve files, one provenance row each).
    let curve_arms = [
        "eval_snapshots[arm=grpo,domain=medical]",
        "eval_snapshots[arm=sft_matched,domain=medical]",
        "eval_snapshots_defences[defence=kl,domain=medical]",
        "eval_snapshots_defences[defence=onpolicy_safety_interleaved_every_fourth_step_with_a_long_name,domain=medical]",
        "eval_snapshots_grpo_cold[domain=medical]",
    ];
    let want: Vec<&str> = conditions
        .iter()
        .map(String::as_str)
        .chain(curve_arms)
        .collect();
    assert_eq!(headings, want, "every condition, in order, then the curves");
    assert_eq!(
        stages,
        arm_origins().len() + 7,
        "every eval stage and curve"
    );
}

/// The measurement can fail: a label wider than its SVG and two labels on one spot.
#[test]
fn browser_measurement_catches_a_clipped_label_and_an_overlap() {
    let Some(browser) = chromium() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let page = r#"<!DOCTYPE html><html><body><svg xmlns="http://www.w3.org/2000/svg" width="80" height="40" viewBox="0 0 80 40" font-size="12"><title>too narrow</title><text x="4" y="16">eval_defences[defence=kl]</text><text x="4" y="34">ab</text><text x="6" y="34">cd</text></svg></body></html>"#;
    let found = measure(&browser, page, tmp.path());
    let clipped = found["clipped"].as_array().unwrap();
    assert_eq!(clipped.len(), 1, "{found}");
    assert!(clipped[0]
        .as_str()
        .unwrap()
        .contains("eval_defences[defence=kl]"));
    assert_eq!(found["overlaps"].as_array().unwrap().len(), 1, "{found}");
}
