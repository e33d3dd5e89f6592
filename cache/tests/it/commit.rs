//! The commit protocol: outputs land read-only under their digest, identical bytes are stored
//! once, and a crash at any step leaves either no record or a complete one.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;
use emflow_cache::{CacheError, EntryKind, Store};

#[test]
fn commit_moves_outputs_read_only_and_writes_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let staging = store.staging("k1").unwrap();
    let staging_path = staging.path().to_path_buf();
    write_outputs(staging.path(), 7, 100_000);
    let record = store
        .commit(
            staging,
            "k1",
            record_for("sft[seed=0]", "2026-01-01T00:00:00Z"),
        )
        .unwrap();

    assert!(
        !staging_path.exists(),
        "staging folder removed after commit"
    );
    assert_eq!(record.key, "k1");
    assert_eq!(record.schema, emflow_cache::RECORD_SCHEMA);
    assert_eq!(record.outputs["weights.bin"].kind, EntryKind::File);
    assert_eq!(record.outputs["weights.bin"].size, 100_000);
    assert_eq!(record.outputs["data"].kind, EntryKind::Tree);
    assert_eq!(record.outputs["data"].size, 10_000 + 8 * 2_000 + 18);
    assert_eq!(store.record("k1").unwrap(), Some(record.clone()));
    assert_outputs_intact(&store, &record);

    let blob = store.artifact_path(&record.outputs["weights.bin"]);
    assert_eq!(fs::read(&blob).unwrap(), bytes(7, 100_000));
    assert_eq!(
        fs::metadata(&blob).unwrap().permissions().mode() & 0o777,
        0o444
    );
    let tree = store.artifact_path(&record.outputs["data"]);
    assert_eq!(
        fs::metadata(&tree).unwrap().permissions().mode() & 0o777,
        0o555
    );
    let mode = |p: &str| fs::metadata(tree.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("shards"), 0o555);
    assert_eq!(mode("train.jsonl"), 0o444);
    assert_eq!(mode("run.sh"), 0o555, "the executable bit survives");
    assert_eq!(
        fs::read(tree.join("shards/3.bin")).unwrap(),
        bytes(703, 2_000)
    );

    let (last_key, last) = store.last_record_for_stage("sft[seed=0]").unwrap().unwrap();
    assert_eq!((last_key.as_str(), last), ("k1", record));
    assert!(store
        .last_record_for_stage("sft[seed=1]")
        .unwrap()
        .is_none());
    assert!(
        tmp_entries(&store).is_empty(),
        "tmp/ is clean: {:?}",
        tmp_entries(&store)
    );
}

#[test]
fn identical_outputs_of_two_stages_share_one_blob_and_one_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut records = Vec::new();
    for key in ["a", "b"] {
        let staging = store.staging(key).unwrap();
        write_outputs(staging.path(), 3, 50_000);
        records.push(store.commit(staging, key, record_for(key, "t")).unwrap());
    }
    assert_eq!(records[0].outputs, records[1].outputs);
    let size = store.size().unwrap();
    assert_eq!(size.blobs.files, 1, "one blob for two identical files");
    assert_eq!(fs::read_dir(dir.path().join("trees")).unwrap().count(), 1);
    assert_outputs_intact(&store, &records[1]);
}

#[test]
fn dropped_staging_leaves_nothing_and_a_failed_output_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let staging = store.staging("k").unwrap();
    write_outputs(staging.path(), 1, 10);
    drop(staging);
    assert!(tmp_entries(&store).is_empty());

    let staging = store.staging("k").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", staging.path().join("link")).unwrap();
    let err = store
        .commit(staging, "k", record_for("s", "t"))
        .unwrap_err();
    assert!(
        matches!(err, CacheError::Symlink { ref path } if path.ends_with("link")),
        "{err}"
    );
    assert!(store.record("k").unwrap().is_none());
    assert!(tmp_entries(&store).is_empty(), "{:?}", tmp_entries(&store));

    let staging = store.staging("k").unwrap();
    let err = store
        .commit(staging, "other", record_for("s", "t"))
        .unwrap_err();
    assert!(
        matches!(err, CacheError::StagingKeyMismatch { .. }),
        "{err}"
    );
    assert!(matches!(
        store.staging("../x"),
        Err(CacheError::InvalidName { .. })
    ));
}

#[test]
fn corrupt_and_tampered_records_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    fs::write(dir.path().join("records/bad.json"), b"{ not json").unwrap();
    let err = store.record("bad").unwrap_err();
    assert!(matches!(err, CacheError::Corrupt { .. }));
    assert!(err.to_string().contains("records/bad.json"), "{err}");

    let staging = store.staging("ok").unwrap();
    fs::write(staging.path().join("f"), b"x").unwrap();
    let mut record = store.commit(staging, "ok", record_for("s", "t")).unwrap();
    record.outputs.get_mut("f").unwrap().digest = "../../../etc/passwd".to_string();
    fs::write(
        dir.path().join("records/forged.json"),
        serde_json::to_vec(&record).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        store.record("forged"),
        Err(CacheError::InvalidRecord { .. })
    ));
}

/// Crashes a commit after each of its durable steps in turn. After every crash the record is
/// either absent or complete, reopening cleans up, and a new commit of the key succeeds.
#[test]
fn a_crash_at_any_commit_step_leaves_no_half_result() {
    let _no_forks = no_forks();
    for prepopulated in [false, true] {
        let mut crash_at = 1;
        loop {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            if prepopulated {
                // The same bytes already stored under another key: exercises the dedupe path.
                let staging = store.staging("earlier").unwrap();
                write_outputs(staging.path(), 5, 30_000);
                store
                    .commit(staging, "earlier", record_for("e", "t"))
                    .unwrap();
            }
            let staging = store.staging("k").unwrap();
            write_outputs(staging.path(), 5, 30_000);
            match store.commit_crashing_at(staging, "k", record_for("s", "t"), crash_at) {
                Ok(record) => {
                    assert!(crash_at > 5, "a commit has more than 5 durable steps");
                    assert_outputs_intact(&store, &record);
                    break;
                }
                Err(CacheError::SimulatedCrash { step }) => assert_eq!(step, crash_at),
                Err(e) => panic!("unexpected error at step {crash_at}: {e}"),
            }
            if let Some(record) = store.record("k").unwrap() {
                assert_outputs_intact(&store, &record);
            }
            let reopened = Store::open(dir.path()).unwrap();
            let leftovers: Vec<String> = tmp_entries(&reopened)
                .into_iter()
                .filter(|n| n.starts_with("stage-"))
                .collect();
            assert!(leftovers.is_empty(), "step {crash_at}: {leftovers:?}");
            let staging = reopened.staging("k").unwrap();
            write_outputs(staging.path(), 5, 30_000);
            let record = reopened.commit(staging, "k", record_for("s", "t")).unwrap();
            assert_outputs_intact(&reopened, &record);
            crash_at += 1;
        }
    }
}

const KILL_ROUNDS: usize = 12;

/// A child that commits keys c0, c1, ... forever, each with content derived from its index.
#[test]
fn child_committing_forever() {
    if std::env::var(CHILD_ENV).as_deref() != Ok("commit-forever") {
        return;
    }
    let store = Store::open(std::env::var("EMFLOW_CACHE_TEST_STORE").unwrap().as_ref()).unwrap();
    println!("ready");
    for i in 0u64.. {
        let key = format!("c{}", i % 40);
        let staging = store.staging(&key).unwrap();
        write_outputs(staging.path(), i % 40, 2_000_000);
        store.commit(staging, &key, record_for(&key, "t")).unwrap();
    }
}

/// Real `kill -9` at random instants of a committing process, then checks the store.
#[test]
fn kill_9_during_commits_never_leaves_a_broken_record_or_a_blocking_leftover() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path()).unwrap();
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    for round in 0..KILL_ROUNDS {
        let mut child = ChildProcess::spawn(
            "commit::child_committing_forever",
            "commit-forever",
            dir.path(),
            "ready",
        );
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(5 + (seed >> 33) % 150));
        child.kill9();

        let store = Store::open(dir.path()).unwrap();
        let leftovers: Vec<String> = tmp_entries(&store);
        assert!(
            leftovers.is_empty(),
            "round {round}: tmp/ not cleaned: {leftovers:?}"
        );
        for (key, record) in store.records().unwrap() {
            assert_outputs_intact(&store, &record);
            let i: u64 = key[1..].parse().unwrap();
            let blob = store.artifact_path(&record.outputs["weights.bin"]);
            assert_eq!(
                fs::read(blob).unwrap(),
                bytes(i, 2_000_000),
                "round {round} key {key}"
            );
        }
    }
    let store = Store::open(dir.path()).unwrap();
    assert!(
        !store.records().unwrap().is_empty(),
        "the child committed something between kills, so kills landed amid commits"
    );
    let staging = store.staging("c0").unwrap();
    write_outputs(staging.path(), 0, 2_000_000);
    let record = store.commit(staging, "c0", record_for("c0", "t")).unwrap();
    assert_outputs_intact(&store, &record);
}

/// Staging, checkpoint and scratch folders are reused instead of removed (an `rmdir` costs
/// ~2.5 ms on the project's ext4); a reused folder starts empty, and the spares a dead
/// process left are removed by the next `open`.
#[test]
fn folders_are_reused_empty_and_a_dead_process_spares_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let scratch = store.scratch().unwrap();
    fs::write(scratch.path().join("junk"), b"left by a command").unwrap();
    fs::create_dir(scratch.path().join("sub")).unwrap();
    drop(scratch);
    let again = store.scratch().unwrap();
    assert_eq!(fs::read_dir(again.path()).unwrap().count(), 0);
    drop(again);

    let staging = store.staging("k").unwrap();
    assert_eq!(fs::read_dir(staging.path()).unwrap().count(), 0);
    write_outputs(staging.path(), 1, 10);
    store.commit(staging, "k", record_for("s", "t")).unwrap();
    let ckpt = store.checkpoint_dir("k").unwrap();
    assert_eq!(fs::read_dir(&ckpt).unwrap().count(), 0);
    store.remove_checkpoint("k").unwrap();
    assert!(!ckpt.exists());
    assert!(tmp_entries(&store).is_empty(), "{:?}", tmp_entries(&store));

    // u32::MAX is no pid a process can have.
    let dead = dir.path().join(format!("tmp/spare-{}-1-0", u32::MAX));
    fs::create_dir(&dead).unwrap();
    Store::open(dir.path()).unwrap();
    assert!(!dead.exists());
}
