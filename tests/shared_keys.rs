//! Two stages whose inputs and params are the same share one stage key: the second to run finds
//! the first one's record and says so by name, rather than blaming another emflow process.

use std::process::Command;

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
    let dir = std::env::temp_dir().join(format!("emflow-twins-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m.yaml"), MANIFEST).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_emflow"))
        .current_dir(&dir)
        .env_remove("EMFLOW_HOME")
        .args(["run", "m.yaml", "--jobs", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    let both = format!("{text}{err}");
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
