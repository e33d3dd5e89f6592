//! Every shipped manifest plans under every one of its profiles: a typo in a profile that
//! only CI or a GPU user would select fails here, on any machine, in milliseconds.

use crate::support::{
    emflow_in_repo, output, paper_data_root, stdout_of, succeed, text, PaperProfile,
};
use std::path::Path;

fn plans(manifest: &str, profile: Option<&str>, sets: &[String]) {
    let store = tempfile::tempdir().unwrap();
    let mut cmd = emflow_in_repo(store.path());
    cmd.args(["graph", manifest, "--format", "json"]);
    if let Some(p) = profile {
        cmd.args(["--profile", p]);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{manifest} --profile {profile:?} does not plan:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let graph: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(graph.to_string().contains("\"id\""), "{graph}");
}

#[test]
fn paper_manifest_plans_under_every_profile() {
    // The default and `smoke` read the quickstart data in the repository.
    for profile in [None, Some("smoke")] {
        plans("manifests/paper.yaml", profile, &[]);
    }
    // The others read the paper's data, wherever the user keeps it.
    let Some((_, set)) = paper_data_root() else {
        return;
    };
    for profile in ["ci", "gpu-small", "paper"] {
        plans(
            "manifests/paper.yaml",
            Some(profile),
            std::slice::from_ref(&set),
        );
    }
}

#[test]
fn a_dry_run_of_the_paper_profile_plans_on_a_machine_without_its_gpus() {
    let Some(paper) = PaperProfile::new() else {
        return;
    };
    let (store, args) = (&paper.store, paper.args());
    let stdout = stdout_of(
        emflow_in_repo(store.path())
            .args(["run", "--dry-run"])
            .args(args),
    );
    assert!(stdout.contains("grpo[domain=medical,seed=0]"), "{stdout}");
    assert!(stdout.contains("report"), "{stdout}");
    if !cfg!(feature = "cuda") {
        // This build sees no GPU: the dry run says a real run would stop, and a real run stops
        // before fetching anything.
        assert!(stdout.contains("would stop first"), "{stdout}");
        let out = emflow_in_repo(store.path())
            .arg("run")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("GPU(s) but 0 are visible"), "{stderr}");
    }
}

/// Full fine-tuning of the 14B model on a 24 GiB card is refused before anything runs, with
/// what to change, and once per stage family: the paper profile's 300-odd GPU stages refused
/// one by one were 640 lines a user had to scroll through to find the reason.
#[test]
fn an_impossible_gpu_plan_is_refused_once_per_stage_family_with_advice() {
    let Some(paper) = PaperProfile::new() else {
        return;
    };
    let out = output(
        emflow_in_repo(paper.store.path())
            .args(["run", "--dry-run"])
            .args(paper.args())
            .args(["--set", "gpu_memory=24GiB"])
            .args(["--set", "stages.warmup.params.full_finetune=true"]),
    );
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warmup = stderr
        .lines()
        .find(|l| l.contains("stages of warmup ("))
        .unwrap_or_else(|| panic!("no grouped warm-up refusal:\n{stderr}"));
    // Each (where, what): the warm-up family's one line, with its advice; the family of one
    // (eval_base) keeps its own name.
    for (haystack, want) in [
        (&*stderr, "the plan cannot fit its GPUs, so nothing ran"),
        (&*stderr, "\n  stage eval_base needs about"),
        (warmup, "12 stages of warmup (warmup[domain=medical,seed=0] ... warmup[domain=aesthetic,seed=2]) each need about"),
        (warmup, "train a LoRA adapter instead of every weight"),
        (warmup, "device has 24.0 GiB"),
    ] {
        assert!(haystack.contains(want), "{want}:\n{haystack}");
    }
    let reasons = stderr
        .lines()
        .filter(|l| l.contains("GiB of GPU memory"))
        .count();
    assert!(
        (2..60).contains(&reasons),
        "{reasons} refusal lines:\n{stderr}"
    );
}

#[test]
fn example_manifests_plan() {
    // The examples read the paper's data; their default `data_root` is where a checkout beside
    // `shared/` finds it, so point them at wherever this machine keeps it.
    let Some((_, set)) = paper_data_root() else {
        return;
    };
    for m in [
        "manifests/examples/datasets.yaml",
        "manifests/examples/grpo_keyword.yaml",
        "manifests/examples/sft_aesthetic.yaml",
    ] {
        plans(m, None, std::slice::from_ref(&set));
    }
}

#[test]
fn paper_manifest_has_every_arm_feeding_the_report() {
    let store = tempfile::tempdir().unwrap();
    let text = succeed(emflow_in_repo(store.path()).args([
        "graph",
        "manifests/paper.yaml",
        "--format",
        "mermaid",
    ]));
    for arm in [
        "grpo[domain=medical",
        "grpo[domain=legal",
        "grpo[domain=security",
        "grpo[domain=aesthetic",
        "grpo_rhetoric[domain=argumentation",
        "sft_matched[domain=medical",
        "defence_kl",
        "defence_ldifs",
        "defence_fixed_safety",
        "defence_onpolicy_safety",
        "defence_inoculation",
        "defence_onpolicy_current",
        "eval_defences[defence=onpolicy_current",
        "eval_base",
        "grpo_cold[domain=medical",
        "grpo_control[domain=medical",
        "grpo_control_rhetoric[domain=argumentation",
        "eval_grpo_cold[domain=medical",
        "eval_grpo_control[domain=medical",
        "eval_in_domain_base[domain=medical",
        "eval_in_domain_warmup[domain=medical",
        "eval_in_domain_sft_matched[domain=medical",
        "eval_in_domain_defences[defence=kl",
        "eval_in_domain_cold[domain=medical",
        "eval_in_domain_control[domain=medical",
        "eval_snapshots[arm=grpo,domain=medical",
        "eval_snapshots[arm=sft_matched,domain=medical",
        "eval_snapshots[arm=grpo,domain=aesthetic",
        "eval_snapshots_grpo_rhetoric[domain=argumentation",
        "eval_snapshots_grpo_cold[domain=security",
        "eval_snapshots_grpo_control[domain=aesthetic",
        "eval_snapshots_grpo_control_rhetoric[domain=argumentation",
        "eval_snapshots_defences[defence=onpolicy_current,domain=medical",
        "eval_snapshots_defences[defence=persona,domain=medical",
        "report",
    ] {
        assert!(text.contains(arm), "the graph lacks {arm}:\n{text}");
    }
}

/// The committed lock of the `ci` profile (CI's `emflow check` reads it) records what every
/// training arm produced. An arm whose adapter came out as it went in trained nothing: that
/// happened once when every arm ran a single step whose learning-rate warm-up made it lr 0,
/// and all the arms' evals then shared one key and one result. (Two GRPO arms may still agree:
/// when all of a step's rewards are equal there is no policy gradient, only weight decay.)
#[test]
fn every_training_arm_of_the_ci_lock_changed_its_adapter() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("manifests/emflow.lock")).unwrap();
    let lock: serde_json::Value = serde_json::from_str(&text).unwrap();
    let section = &lock["manifests"]["paper.yaml"];
    assert_eq!(section["profile"], "ci");
    let stages = section["stages"].as_object().unwrap();
    let mut arms = 0;
    // Arms that start from a fresh adapter, by what they produced: different data must give
    // different adapters.
    let mut fresh = std::collections::BTreeMap::new();
    for (id, stage) in stages {
        if !matches!(stage["kind"].as_str(), Some("sft" | "rl")) {
            continue;
        }
        arms += 1;
        let out = stage["outputs"]["adapter"].as_str().unwrap().to_string();
        let kind = stage["kind"].as_str().unwrap_or_default().to_string();
        match stage["key_parts"]["inputs"]["adapter"][0].as_str() {
            Some(input) => assert_ne!(input, out, "{id} returned its input adapter unchanged"),
            None => {
                // Two fresh GRPO arms may agree (see above): in the ci profile bad and good
                // rhetoric each take one step whose rewards are all equal, so both adapters
                // are the seeded initial one after weight decay. Two fresh SFT arms never may.
                if let Some((other, other_kind)) = fresh.insert(out, (id.clone(), kind.clone())) {
                    assert!(
                        kind == "rl" && other_kind == "rl",
                        "{id} and {other} produced the same adapter from a fresh start"
                    );
                }
            }
        }
    }
    assert!(arms >= 15, "{arms} training arms");
}

/// The quickstart's data stages run (not only plan): a `take` asking for more questions than a
/// set has passed planning and failed the quickstart's first seconds once.
#[test]
fn smoke_profile_data_stages_run() {
    let store = tempfile::tempdir().unwrap();
    let mut cmd = emflow_in_repo(store.path());
    cmd.args(["run", "manifests/paper.yaml", "--profile", "smoke"]);
    for stage in [
        "warmup_data",
        "rl_prompts",
        "general_questions",
        "domain_questions",
        "fixed_safety",
        "safety_prompts",
    ] {
        cmd.args(["--only", stage]);
    }
    succeed(&mut cmd);
}
