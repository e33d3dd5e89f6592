//! `manifests/examples/datasets.yaml` end to end through the `emflow` binary: the first run
//! builds every dataset from the paper's files, the second does no work and says so for
//! every stage. Skipped (with the reason printed) when the paper data is absent.

use std::path::Path;

use crate::support::{emflow_in_repo, paper_data_root, scratch, succeed};

const STAGES: usize = 14;

/// What `emflow ARGS` said; fails the test unless it succeeded.
fn emflow(store: &Path, args: &[&str]) -> String {
    succeed(emflow_in_repo(store).args(args))
}

#[test]
fn datasets_example_builds_then_is_fully_cached() {
    let Some((_, set)) = paper_data_root() else {
        return;
    };
    let store = scratch("datasets-example");
    let run = ["run", "manifests/examples/datasets.yaml", "--set", &set];

    let first = emflow(&store, &run);
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

    let second = emflow(&store, &run);
    assert_eq!(second.matches("  CACHED  ").count(), STAGES, "{second}");
    assert!(
        second.contains(&format!("nothing to do: all {STAGES} stages cached")),
        "{second}"
    );

    // The command stage counted the rows of the three SFT sets and the three RL sets.
    let listing = emflow(&store, &["cache", "ls"]);
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("row_counts"))
        .unwrap_or_else(|| panic!("{listing}"));
    let key = line.split_whitespace().next().unwrap();
    let record = emflow(&store, &["cache", "show", key]);
    let path = record
        .lines()
        .find_map(|l| l.strip_prefix("output counts: "))
        .unwrap_or_else(|| panic!("{record}"));
    assert_eq!(
        std::fs::read_to_string(path.trim()).unwrap(),
        "100\n100\n100\n64\n64\n64\n"
    );
    exports_under_natural_names(&store, &set);
    let _ = std::fs::remove_dir_all(&store);
}

/// `emflow export`: a messages output becomes `data.jsonl` with the stored bytes, a command's
/// file keeps its name, a second export replaces the first, and an unknown stage is refused.
fn exports_under_natural_names(store: &Path, set: &str) {
    let to = store.join("exported");
    let to_arg = to.display().to_string();
    let manifest = "manifests/examples/datasets.yaml";
    let export = [
        "export",
        manifest,
        "--set",
        set,
        "--to",
        &to_arg,
        "sft_warmup[domain=medical]",
        "row_counts",
    ];
    for _ in 0..2 {
        let said = emflow(store, &export);
        assert!(
            said.contains("Exported  sft_warmup[domain=medical].data -> "),
            "{said}"
        );
    }
    let stored = emflow(
        store,
        &["cache", "path", "sft_warmup[domain=medical]", "data"],
    );
    let exported = to.join("sft_warmup[domain=medical]").join("data.jsonl");
    assert_eq!(
        std::fs::read(&exported).unwrap(),
        std::fs::read(stored.trim()).unwrap()
    );
    let counts = std::fs::read_to_string(to.join("row_counts").join("counts")).unwrap();
    assert_eq!(counts, "100\n100\n100\n64\n64\n64\n");
    let refused = crate::support::output(
        emflow_in_repo(store).args(["export", manifest, "--set", set, "--to", &to_arg, "no_such"]),
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no stage or stage instance `no_such`")
    );
}
