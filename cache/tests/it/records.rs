//! Records, the stage index, memo and run journals as the engine uses them.

use std::fs;

use crate::support::*;
use emflow_cache::Store;

/// The key of the last record of stage `id`.
fn last_key(store: &Store, id: &str) -> String {
    store.last_record_for_stage(id).unwrap().unwrap().0
}

#[test]
fn last_record_for_stage_follows_commits_and_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for (key, when) in [("k-a", "2026-01-01"), ("k-b", "2026-01-02")] {
        let staging = store.staging(key).unwrap();
        fs::write(staging.path().join("out"), key.as_bytes()).unwrap();
        store
            .commit(staging, key, record_for("grpo[seed=1]", when))
            .unwrap();
    }
    assert_eq!(last_key(&store, "grpo[seed=1]"), "k-b");
    store.note_stage_record("grpo[seed=1]", "k-a").unwrap();
    assert_eq!(last_key(&store, "grpo[seed=1]"), "k-a");
    // Without the index (e.g. lost), the newest record by finish time is found by a scan.
    for entry in fs::read_dir(dir.path().join("stage-index")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    assert_eq!(last_key(&store, "grpo[seed=1]"), "k-b");
    let keys: Vec<String> = store
        .records()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["k-a", "k-b"]);
}

#[test]
fn memo_and_runs_round_trip_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.memo_get("judge", b"question").unwrap(), None);
    store.memo_put("judge", b"question", b"aligned").unwrap();
    store.memo_put("judge", b"question", b"misaligned").unwrap();
    store.memo_put("other", b"question", b"x").unwrap();
    let run = serde_json::json!({ "keys": ["k1", "k2"], "ok": true });
    store.write_run("2026-01-01T00-00-00-1", &run).unwrap();

    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(
        reopened.memo_get("judge", b"question").unwrap(),
        Some(b"misaligned".to_vec())
    );
    assert_eq!(
        reopened.memo_get("other", b"question").unwrap(),
        Some(b"x".to_vec())
    );
    assert_eq!(
        reopened.runs().unwrap(),
        vec![("2026-01-01T00-00-00-1".to_string(), run)]
    );
    assert!(
        reopened.memo_get("a/b", b"q").is_err(),
        "namespaces are single path components"
    );
    assert!(tmp_entries(&reopened).is_empty());
}

#[test]
fn checkpoints_persist_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ckpt = store.checkpoint_dir("k").unwrap();
    fs::write(ckpt.join("state"), b"step 10").unwrap();
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(
        fs::read(reopened.checkpoint_dir("k").unwrap().join("state")).unwrap(),
        b"step 10"
    );
    reopened.remove_checkpoint("k").unwrap();
    reopened.remove_checkpoint("k").unwrap();
    assert!(!ckpt.exists());
}

#[test]
fn digest_path_of_a_user_folder_matches_the_committed_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store").as_path()).unwrap();
    let user = dir.path().join("user");
    fs::create_dir(&user).unwrap();
    write_outputs(&user, 9, 300_000);
    let folder_digest = store.digest_path(&user.join("data")).unwrap();
    let file_digest = store.digest_path(&user.join("weights.bin")).unwrap();

    let staging = store.staging("k").unwrap();
    write_outputs(staging.path(), 9, 300_000);
    let record = store.commit(staging, "k", record_for("s", "t")).unwrap();
    assert_eq!(record.outputs["data"].digest, folder_digest);
    assert_eq!(record.outputs["weights.bin"].digest, file_digest);

    // A user folder may link to files (a Hugging Face snapshot does): it hashes as a copy.
    let linked = dir.path().join("linked");
    fs::create_dir(&linked).unwrap();
    fs::create_dir(linked.join("data")).unwrap();
    let copy = dir.path().join("copy");
    fs::create_dir_all(copy.join("data")).unwrap();
    fs::write(dir.path().join("blob"), b"content").unwrap();
    fs::write(copy.join("data/file"), b"content").unwrap();
    std::os::unix::fs::symlink(dir.path().join("blob"), linked.join("data/file")).unwrap();
    assert_eq!(
        store.digest_path(&linked).unwrap(),
        store.digest_path(&copy).unwrap()
    );
}
