//! GPU stages get distinct devices: each child process sees exactly its own GPU in
//! `CUDA_VISIBLE_DEVICES`, taken from the driver's inherited `CUDA_VISIBLE_DEVICES`.
//! Needs no GPU: the command kind only reports what it was given.

use crate::support::{emflow_in, output, scratch_with_manifest, succeed};

const MANIFEST: &str = r#"
emflow: 1
name: gpus
stages:
  first:
    kind: command
    params:
      which: first
      run: 'sleep 0.3; echo "$CUDA_VISIBLE_DEVICES" > "$EMFLOW_OUT_SEEN"'
      outputs: {seen: file}
    resources: {gpus: 1, cpus: 1}
  second:
    kind: command
    params:
      which: second
      run: 'sleep 0.3; echo "$CUDA_VISIBLE_DEVICES" > "$EMFLOW_OUT_SEEN"'
      outputs: {seen: file}
    resources: {gpus: 1, cpus: 1}
  both:
    kind: command
    inputs:
      files: [first.seen, second.seen]
    params:
      run: 'cat "$EMFLOW_IN_FILES_0" "$EMFLOW_IN_FILES_1" > "$EMFLOW_OUT_ALL"'
      outputs: {all: file}
"#;

#[test]
fn gpu_stages_get_distinct_inherited_devices() {
    let dir = scratch_with_manifest("gpu-slots", MANIFEST);
    succeed(
        emflow_in(&dir)
            .env_remove("EMFLOW_GPUS")
            .env("CUDA_VISIBLE_DEVICES", "5,7")
            .args(["run", "m.yaml", "--jobs", "4"]),
    );
    let listing = succeed(emflow_in(&dir).args(["cache", "ls"]));
    let key = listing
        .lines()
        .find(|l| l.contains(" both "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let record = succeed(emflow_in(&dir).args(["cache", "show", &key]));
    let path = record
        .lines()
        .find_map(|l| l.strip_prefix("output all: "))
        .unwrap();
    let mut seen: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    seen.sort();
    assert_eq!(seen, ["5", "7"], "each GPU stage sees its own device");

    // Asking for more GPUs than are visible is refused before anything runs.
    let refused = output(
        emflow_in(&dir)
            .env_remove("EMFLOW_GPUS")
            .env("CUDA_VISIBLE_DEVICES", "")
            .args(["run", "m.yaml", "--force", "first"]),
    );
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("asks for 1 GPU(s) but 0 are visible"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
