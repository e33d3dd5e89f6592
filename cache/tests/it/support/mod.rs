//! Helpers shared by the store's integration tests: child processes for kill tests,
//! deterministic output trees, and checks that a record's outputs are intact.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use emflow_cache::{hash_file, EntryKind, StageRecord, Store};

/// Environment variable that turns a test binary into a helper child process.
pub const CHILD_ENV: &str = "EMFLOW_CACHE_TEST_CHILD";

/// Held while a child process starts, and by a test that expects a lock it released to be free
/// at once. A child forked by another test thread holds copies of this process's descriptors
/// until it execs, and with them every flock they carry: CI once saw an abandoned staging
/// folder's owner lock still held that way, so `Store::open` (rightly) left the folder.
static FORKS: Mutex<()> = Mutex::new(());

/// Keeps other test threads from starting child processes while the guard lives.
pub fn no_forks() -> MutexGuard<'static, ()> {
    FORKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A helper process running this test binary; killed when dropped, so a failing test
/// never leaves it running.
pub struct ChildProcess(Child);

impl ChildProcess {
    /// Starts this test binary again, running only `test_name` (its path in the binary,
    /// such as `locks::child_holding_a_lock`) with `role` in the environment, and waits
    /// until it prints `ready_line`.
    pub fn spawn(test_name: &str, role: &str, store: &Path, ready_line: &str) -> ChildProcess {
        // Held until the child prints its ready line, by which time it has exec'd.
        let _forking = no_forks();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, role)
            .env("EMFLOW_CACHE_TEST_STORE", store)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let guard = ChildProcess(child);
        // The harness prints its own lines first, and "test NAME ... " just before the test
        // body runs, on the same line.
        let found = BufReader::new(stdout)
            .lines()
            .any(|line| line.is_ok_and(|l| l.trim_end().ends_with(ready_line)));
        assert!(found, "child {role} exited before printing {ready_line:?}");
        guard
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL) };
        self.0.wait().unwrap();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so content differs per seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes the outputs of a fake stage: a file `weights.bin` and a folder `data/`.
pub fn write_outputs(dir: &Path, seed: u64, big: usize) {
    fs::write(dir.join("weights.bin"), bytes(seed, big)).unwrap();
    let data = dir.join("data");
    fs::create_dir_all(data.join("shards")).unwrap();
    fs::write(data.join("train.jsonl"), bytes(seed + 1, 10_000)).unwrap();
    for i in 0..8 {
        fs::write(
            data.join(format!("shards/{i}.bin")),
            bytes(seed * 100 + i, 2_000),
        )
        .unwrap();
    }
    let run = data.join("run.sh");
    fs::write(&run, b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A record as the engine would pass it (outputs are filled by `commit`).
pub fn record_for(stage_id: &str, finished_at: &str) -> StageRecord {
    StageRecord {
        stage_id: stage_id.to_string(),
        kind: "test".to_string(),
        key_parts: serde_json::json!({ "params": { "lr": 0.1 } }),
        finished_at: finished_at.to_string(),
        ..StageRecord::default()
    }
}

/// Checks that every output of a record is in the store with exactly the recorded digest.
pub fn assert_outputs_intact(store: &Store, record: &StageRecord) {
    assert!(
        store.damaged_outputs(record).unwrap().is_empty(),
        "outputs of {} damaged",
        record.key
    );
    for (name, entry) in &record.outputs {
        let path = store.artifact_path(entry);
        let digest = match entry.kind {
            EntryKind::File => hash_file(&path).unwrap(),
            EntryKind::Tree => store.digest_path(&path).unwrap(),
        };
        assert_eq!(
            digest, entry.digest,
            "output {name} of {} is damaged",
            record.key
        );
    }
}

/// Names of the entries in the store's tmp/ folder.
pub fn tmp_entries(store: &Store) -> Vec<String> {
    // This process's spare folders (empty, kept for reuse) are not leftovers.
    let spare = format!("spare-{}-", std::process::id());
    let mut names: Vec<String> = fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !(name.starts_with(&spare) && fs::read_dir(e.path()).unwrap().next().is_none())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
