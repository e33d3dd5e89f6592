//! `manifests/examples/datasets.yaml` end to end through the `emflow` binary: the first run
//! builds every dataset from the paper's files, the second does no work and says so for
//! every stage. Skipped (with the reason printed) when the paper data is absent.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const STAGES: usize = 14;

fn paper_data() -> Option<PathBuf> {
    let path = match std::env::var_os("EMFLOW_PAPER_DATA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/paper-data"),
    };
    if path.join("sft").is_dir() {
        Some(std::path::absolute(path).unwrap())
    } else {
        eprintln!(
            "SKIPPED: paper data not found at {} (set EMFLOW_PAPER_DATA)",
            path.display()
        );
        None
    }
}

fn emflow(store: &Path, args: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_emflow"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("EMFLOW_HOME")
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "emflow {args:?} failed:\n{text}");
    (out, text)
}

#[test]
fn datasets_example_builds_then_is_fully_cached() {
    let Some(data) = paper_data() else { return };
    let store =
        std::env::temp_dir().join(format!("emflow-datasets-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let set = format!("data_root={}", data.display());
    let run = ["run", "manifests/examples/datasets.yaml", "--set", &set];

    let (_, first) = emflow(&store, &run);
    assert_eq!(first.matches("    PASS  ").count(), STAGES, "{first}");
    for id in [
        "sft_warmup[domain=medical]",
        "rl_prompts[domain=security]",
        "heldout[domain=legal]",
        "eval_general",
        "row_counts",
    ] {
        assert!(
            first.contains(&format!("PASS  {id}")),
            "{id} did not run:\n{first}"
        );
    }

    let (_, second) = emflow(&store, &run);
    assert_eq!(second.matches("  CACHED  ").count(), STAGES, "{second}");
    assert!(
        second.contains(&format!("nothing to do: all {STAGES} stages cached")),
        "{second}"
    );

    // The command stage counted the rows of the three SFT sets and the three RL sets.
    let (_, listing) = emflow(&store, &["cache", "ls"]);
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("row_counts"))
        .unwrap_or_else(|| panic!("{listing}"));
    let key = line.split_whitespace().next().unwrap();
    let (_, record) = emflow(&store, &["cache", "show", key]);
    let path = record
        .lines()
        .find_map(|l| l.strip_prefix("output counts: "))
        .unwrap_or_else(|| panic!("{record}"));
    assert_eq!(
        std::fs::read_to_string(path.trim()).unwrap(),
        "100\n100\n100\n64\n64\n64\n"
    );
    let _ = std::fs::remove_dir_all(&store);
}
