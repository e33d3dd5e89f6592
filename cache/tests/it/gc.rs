//! Garbage collection keeps what kept records reach and frees the rest.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use crate::support::*;
use emflow_cache::{CacheError, GcOptions, Store};

fn commit(
    store: &Store,
    key: &str,
    write: impl FnOnce(&std::path::Path),
) -> emflow_cache::StageRecord {
    let staging = store.staging(key).unwrap();
    write(staging.path());
    store.commit(staging, key, record_for(key, "t")).unwrap()
}

fn keep(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

#[test]
fn gc_keeps_what_kept_records_reach_and_frees_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dropped = commit(&store, "dropped", |d| write_outputs(d, 1, 40_000));
    let kept = commit(&store, "kept", |d| {
        fs::write(d.join("only"), b"kept bytes").unwrap()
    });
    // Shares its blob with `dropped`: the blob must survive.
    let sharer = commit(&store, "sharer", |d| {
        fs::write(d.join("w"), bytes(1, 40_000)).unwrap()
    });
    assert_eq!(sharer.outputs["w"], dropped.outputs["weights.bin"]);
    fs::write(store.checkpoint_dir("dropped").unwrap().join("step"), b"1").unwrap();
    fs::write(store.checkpoint_dir("kept").unwrap().join("step"), b"1").unwrap();
    store.memo_put("judge", b"q", b"verdict").unwrap();

    let before = store.size().unwrap();
    let roots = keep(&["kept", "sharer"]);
    let dry = store
        .gc(
            &roots,
            &GcOptions {
                dry_run: true,
                keep_memo_newer_than: Some(Duration::ZERO),
            },
        )
        .unwrap();
    assert_eq!(dry.records_removed, vec!["dropped".to_string()]);
    assert_eq!(
        (dry.trees_removed, dry.blobs_removed, dry.blobs_kept),
        (1, 0, 2)
    );
    assert_eq!((dry.checkpoints_removed, dry.memo_entries_removed), (1, 1));
    assert!(dry.bytes_freed >= 10_000 + 8 * 2_000);
    assert_eq!(store.size().unwrap(), before, "a dry run removes nothing");
    assert!(store.record("dropped").unwrap().is_some());

    let report = store
        .gc(
            &roots,
            &GcOptions {
                dry_run: false,
                keep_memo_newer_than: Some(Duration::ZERO),
            },
        )
        .unwrap();
    assert_eq!(report.records_removed, dry.records_removed);
    assert_eq!(report.bytes_freed, dry.bytes_freed);
    assert!(store.record("dropped").unwrap().is_none());
    assert!(!store.artifact_path(&dropped.outputs["data"]).exists());
    assert_outputs_intact(&store, &store.record("kept").unwrap().unwrap());
    assert_outputs_intact(&store, &store.record("sharer").unwrap().unwrap());
    assert_eq!(kept, store.record("kept").unwrap().unwrap());
    assert!(!dir.path().join("checkpoints/dropped").exists());
    assert!(dir.path().join("checkpoints/kept/step").exists());
    assert_eq!(store.memo_get("judge", b"q").unwrap(), None);
    assert!(store.size().unwrap().total_bytes < before.total_bytes);

    let again = store.gc(&roots, &GcOptions::default()).unwrap();
    assert_eq!(
        (again.bytes_freed, again.records_kept),
        (0, 2),
        "gc is idempotent"
    );
}

#[test]
fn memo_entries_younger_than_the_limit_survive() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.memo_put("judge", b"q", b"v").unwrap();
    let opts = GcOptions {
        dry_run: false,
        keep_memo_newer_than: Some(Duration::from_secs(3600)),
    };
    store.gc(&BTreeSet::new(), &opts).unwrap();
    assert_eq!(store.memo_get("judge", b"q").unwrap(), Some(b"v".to_vec()));
}

#[test]
fn gc_refuses_while_a_run_pins_the_store_and_removes_corrupt_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let pin = store.pin().unwrap();
    let err = store
        .gc(&BTreeSet::new(), &GcOptions::default())
        .unwrap_err();
    assert!(matches!(err, CacheError::StoreBusy { .. }), "{err}");
    drop(pin);

    fs::write(dir.path().join("records/broken.json"), b"{").unwrap();
    assert!(
        store.records().is_err(),
        "a corrupt record is reported, not skipped"
    );
    let report = store.gc(&keep(&["broken"]), &GcOptions::default()).unwrap();
    assert_eq!(report.records_removed, vec!["broken".to_string()]);
    assert!(store.records().unwrap().is_empty());
}

#[test]
fn gc_clears_leftovers_of_a_dead_stage_but_not_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let live = store.staging("live").unwrap();
    fs::write(live.path().join("partial"), b"half").unwrap();
    // What a killed process leaves: a staging folder whose owner lock nobody holds.
    let dead_dir = dir.path().join("tmp/stage-dead-1-2-3");
    fs::create_dir(&dead_dir).unwrap();
    fs::write(dead_dir.join("partial"), b"half").unwrap();
    fs::write(dir.path().join("tmp/stage-dead-1-2-3.owner"), b"").unwrap();

    store.gc(&BTreeSet::new(), &GcOptions::default()).unwrap();
    assert!(!dead_dir.exists());
    assert!(
        live.path().join("partial").exists(),
        "a running stage's staging is untouched"
    );
}

#[test]
fn dropping_memo_namespaces_takes_the_prefix_and_its_dotted_versions_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for ns in ["judge", "judge.v1", "judgement", "other"] {
        store.memo_put(ns, b"q", b"v").unwrap();
    }
    store.memo_put("judge.v1", b"q2", b"v2").unwrap();
    assert_eq!(store.drop_memo_namespaces("judge", true).unwrap().0, 3);
    assert!(
        store.memo_get("judge.v1", b"q").unwrap().is_some(),
        "dry run"
    );

    let pin = store.pin().unwrap();
    assert!(matches!(
        store.drop_memo_namespaces("judge", false),
        Err(CacheError::StoreBusy { .. })
    ));
    drop(pin);

    let (entries, bytes) = store.drop_memo_namespaces("judge", false).unwrap();
    assert_eq!((entries, bytes), (3, 4), "v, v and v2");
    assert_eq!(store.memo_get("judge", b"q").unwrap(), None);
    assert_eq!(store.memo_get("judge.v1", b"q2").unwrap(), None);
    assert!(store.memo_get("judgement", b"q").unwrap().is_some());
    assert!(store.memo_get("other", b"q").unwrap().is_some());
}
