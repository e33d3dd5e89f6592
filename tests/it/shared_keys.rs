//! Two stages whose inputs and params are the same share one stage key: the second to run finds
//! the first one's record and says so by name, rather than blaming another emflow process.

use crate::support::{emflow_in, scratch_with_manifest, succeed};

const MANIFEST: &str = r#"
emflow: 1
name: twins
stages:
  left:
    kind: command
    params:
      run: 'echo same > "$EMFLOW_OUT_TEXT"'
      outputs: {text: file}
  right:
    kind: command
    params:
      run: 'echo same > "$EMFLOW_OUT_TEXT"'
      outputs: {text: file}
"#;

#[test]
fn a_stage_sharing_a_key_with_an_earlier_one_names_it() {
    let dir = scratch_with_manifest("shared-keys", MANIFEST);
    let both = succeed(emflow_in(&dir).args(["run", "m.yaml", "--jobs", "1"]));
    let line = both
        .lines()
        .find(|l| l.contains("CACHED"))
        .unwrap_or_else(|| panic!("no stage was served from the cache:\n{both}"));
    assert!(
        line.contains("the same key as left") || line.contains("the same key as right"),
        "{line}"
    );
    assert!(!both.contains("another emflow process"), "{both}");
    let _ = std::fs::remove_dir_all(&dir);
}
