//! Every shipped manifest plans under every one of its profiles: a typo in a profile that
//! only CI or a GPU user would select fails here, on any machine, in milliseconds.

use std::path::Path;
use std::process::Command;

fn plans(manifest: &str, profile: Option<&str>, sets: &[String]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let store = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_emflow"));
    cmd.current_dir(root)
        .arg("--store")
        .arg(store.path())
        .args(["graph", manifest, "--format", "json"]);
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
    let Some(data) = emflow_model::testing::paper_data() else {
        return;
    };
    let set = format!("data_root={}", data.display());
    for profile in ["ci", "gpu-small", "paper"] {
        plans(
            "manifests/paper.yaml",
            Some(profile),
            std::slice::from_ref(&set),
        );
    }
}

#[test]
fn example_manifests_plan() {
    for m in [
        "manifests/examples/datasets.yaml",
        "manifests/examples/grpo_keyword.yaml",
        "manifests/examples/sft_aesthetic.yaml",
    ] {
        plans(m, None, &[]);
    }
}

#[test]
fn paper_manifest_has_every_arm_feeding_the_report() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let store = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_emflow"))
        .current_dir(root)
        .arg("--store")
        .arg(store.path())
        .args(["graph", "manifests/paper.yaml", "--format", "mermaid"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
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
        "eval_base",
        "report",
    ] {
        assert!(text.contains(arm), "the graph lacks {arm}:\n{text}");
    }
}
