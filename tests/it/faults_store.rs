//! Fault injection on a real store, through the real binary: a committed output whose bytes
//! are damaged (one byte flipped, truncated, deleted, replaced by another blob's bytes; in a
//! file or inside a folder) is never served as cached. The next `emflow run` re-executes the
//! stage that made it, and only what depends on a *changed* output; `emflow verify` names
//! the stage before the repair and passes after; `emflow cache verify` finds it without a
//! manifest and `--repair` removes it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{emflow_in, output, scratch_with_manifest, succeed, text, Scratch};

fn emflow_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = emflow_in(dir);
    cmd.env("NO_COLOR", "1")
        .arg("--store")
        .arg(dir.join("store"))
        .args(args);
    cmd
}

fn emflow(dir: &Path, args: &[&str]) -> Output {
    output(&mut emflow_cmd(dir, args))
}

fn run_ok(dir: &Path, args: &[&str]) -> String {
    succeed(&mut emflow_cmd(dir, args))
}

/// `alpha` writes 109 kB (large enough for the file memo), `beta` spells its digits as letters, `gamma`
/// writes something else, `delta` writes a folder of two files.
const MANIFEST: &str = r#"emflow: 1
name: faults
stages:
  alpha:
    kind: command
    params:
      run: 'seq 1 20000 > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
  beta:
    kind: command
    inputs:
      files: [alpha.out]
    params:
      run: 'tr 0-9 a-j < "$EMFLOW_IN_FILES" > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
  gamma:
    kind: command
    params:
      run: 'echo gamma > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
  delta:
    kind: command
    params:
      run: 'mkdir -p "$EMFLOW_OUT_D/sub"; echo one > "$EMFLOW_OUT_D/a.txt"; seq 1 5000 > "$EMFLOW_OUT_D/sub/b.txt"'
      outputs: {d: dir}
"#;

fn setup(name: &str) -> Scratch {
    let dir = scratch_with_manifest(&format!("faults-store-{name}"), MANIFEST);
    let first = run_ok(&dir, &["run", "m.yaml"]);
    for stage in ["alpha", "beta", "gamma", "delta"] {
        assert!(first.contains(&format!("PASS  {stage}")), "{first}");
    }
    dir
}

/// The committed path of output `output` of stage `stage`, read from its record.
fn blob(dir: &Path, stage: &str, output: &str) -> PathBuf {
    let store = dir.join("store");
    for entry in fs::read_dir(store.join("records")).unwrap() {
        let record: serde_json::Value =
            serde_json::from_slice(&fs::read(entry.unwrap().path()).unwrap()).unwrap();
        if record["stage_id"] == stage {
            let out = &record["outputs"][output];
            let digest = out["digest"].as_str().unwrap();
            let area = if out["kind"] == "tree" {
                "trees"
            } else {
                "objects"
            };
            return store.join(area).join(&digest[..2]).join(digest);
        }
    }
    panic!("no record of {stage}");
}

/// Writes `bytes` over a read-only store file the way a careless tool would.
fn overwrite(path: &Path, bytes: &[u8]) {
    let mode = fs::metadata(path).unwrap().permissions().mode();
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn flip_one_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    overwrite(path, &bytes);
}

#[derive(Clone, Copy, Debug)]
enum Harm {
    Flip,
    Truncate,
    Delete,
    OtherBlob,
}

fn harm(dir: &Path, path: &Path, how: Harm) {
    match how {
        Harm::Flip => flip_one_byte(path),
        Harm::Truncate => {
            let bytes = fs::read(path).unwrap();
            overwrite(path, &bytes[..bytes.len() / 3]);
        }
        Harm::Delete => fs::remove_file(path).unwrap(),
        Harm::OtherBlob => {
            let other = fs::read(blob(dir, "gamma", "out")).unwrap();
            overwrite(path, &other);
        }
    }
}

/// The check the issue names, for each kind of damage to a file output: `verify` fails
/// naming the stage, the next run re-executes exactly that stage (its downstream gets the
/// same bytes back, so it stays cached), the blob is restored, and `verify` then passes.
#[test]
fn every_kind_of_damage_to_a_file_reruns_only_that_stage() {
    for how in [Harm::Flip, Harm::Truncate, Harm::Delete, Harm::OtherBlob] {
        let dir = setup(&format!("{how:?}").to_lowercase());
        let path = blob(&dir, "alpha", "out");
        let good = fs::read(&path).unwrap();
        harm(&dir, &path, how);

        let status = run_ok(&dir, &["status", "m.yaml"]);
        assert!(status.contains("DAMAGED  alpha"), "{how:?}: {status}");
        let before = emflow(&dir, &["verify", "m.yaml"]);
        let said = text(&before);
        assert!(!before.status.success(), "{how:?}: verify passed:\n{said}");
        assert!(
            said.contains("DAMAGED  alpha") && said.contains("did not verify: alpha"),
            "{how:?}: {said}"
        );

        let rerun = run_ok(&dir, &["run", "m.yaml"]);
        assert!(rerun.contains("DAMAGED  alpha"), "{how:?}: {rerun}");
        assert!(rerun.contains("PASS  alpha"), "{how:?}: {rerun}");
        for stage in ["beta", "gamma", "delta"] {
            assert!(
                rerun.contains(&format!("CACHED  {stage}")),
                "{how:?}: {stage} was not served from the cache:\n{rerun}"
            );
        }
        assert_eq!(fs::read(&path).unwrap(), good, "{how:?}: blob not restored");
        let after = emflow(&dir, &["verify", "m.yaml"]);
        assert!(after.status.success(), "{how:?}: {}", text(&after));
        let _ = fs::remove_dir_all(&dir);
    }
}

/// A byte flipped inside a committed folder: the folder is swapped for a fresh one.
#[test]
fn damage_inside_a_folder_output_is_found_and_the_folder_replaced() {
    let dir = setup("tree");
    let tree = blob(&dir, "delta", "d");
    flip_one_byte(&tree.join("sub/b.txt"));
    let rerun = run_ok(&dir, &["run", "m.yaml"]);
    assert!(
        rerun.contains("DAMAGED  delta") && rerun.contains("PASS  delta"),
        "{rerun}"
    );
    assert!(rerun.contains("CACHED  alpha"), "{rerun}");
    let b = fs::read_to_string(tree.join("sub/b.txt")).unwrap();
    assert!(b.starts_with("1\n2\n3\n") && b.ends_with("5000\n"), "{b}");
    run_ok(&dir, &["verify", "m.yaml", "delta"]);
}

/// The file memo (a digest reused while a file's stamp is unchanged) must not hide a write
/// that restores the old mtime: ctime still moves.
#[test]
fn a_memoised_blob_rewritten_with_its_old_mtime_is_still_caught() {
    let dir = setup("memo");
    // Let the racy window pass so the no-op run below memoises alpha's 100 kB blob.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let noop = run_ok(&dir, &["run", "m.yaml"]);
    assert!(noop.contains("CACHED  alpha"), "{noop}");
    assert!(
        fs::read_dir(dir.join("store/filememo")).unwrap().count() > 0,
        "the no-op run memoised nothing; this test would not test the memo"
    );
    let path = blob(&dir, "alpha", "out");
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    flip_one_byte(&path);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let file = fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    let rerun = run_ok(&dir, &["run", "m.yaml"]);
    assert!(rerun.contains("PASS  alpha"), "{rerun}");
}

/// `--force` used to keep the damaged file "because the digest is already there".
#[test]
fn force_replaces_a_damaged_blob_of_the_same_digest() {
    let dir = setup("force");
    let path = blob(&dir, "gamma", "out");
    flip_one_byte(&path);
    run_ok(&dir, &["run", "m.yaml", "--force", "gamma"]);
    assert_eq!(fs::read_to_string(&path).unwrap(), "gamma\n");
}

/// Without a manifest: every blob rehashed, the damaged one named with its stage; `--repair`
/// removes it and the next run rebuilds it.
#[test]
fn cache_verify_finds_and_repair_removes_damaged_blobs() {
    let dir = setup("audit");
    let clean = run_ok(&dir, &["cache", "verify"]);
    assert!(clean.contains("match their digests"), "{clean}");

    let path = blob(&dir, "beta", "out");
    flip_one_byte(&path);
    let found = emflow(&dir, &["cache", "verify"]);
    let said = text(&found);
    assert_eq!(found.status.code(), Some(1), "{said}");
    assert!(said.contains("output of beta"), "{said}");
    assert!(path.exists(), "without --repair nothing is removed");

    run_ok(&dir, &["cache", "verify", "--repair"]);
    assert!(!path.exists());
    let rerun = run_ok(&dir, &["run", "m.yaml"]);
    assert!(rerun.contains("PASS  beta"), "{rerun}");
    assert!(rerun.contains("CACHED  alpha"), "{rerun}");
    let again = run_ok(&dir, &["cache", "verify"]);
    assert!(again.contains("match their digests"), "{again}");
}
