//! The driver's journal: for each stage key, the Slurm job of its latest attempt.
//!
//! Written (atomically) right after `sbatch` answers, before the driver waits on the job,
//! so a driver killed at any later point finds the job again when restarted and attaches
//! to it instead of submitting the stage a second time. The window between `sbatch` and
//! the write is covered by the job's name and comment (see `queue::active_emflow_jobs`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::job::write_json_atomic;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub job_id: String,
    pub attempt: u32,
    pub attempt_dir: PathBuf,
    pub run_id: String,
    pub submitted_at: String,
    /// Bytes and seconds asked for (they grow on retries).
    pub memory: u64,
    pub time_s: u64,
    pub retries: u32,
    pub requeues: u32,
}

pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn new(slurm_root: &Path) -> Self {
        Journal {
            dir: slurm_root.join("journal"),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The latest attempt of `key`, if any (an unreadable entry counts as none: the worst
    /// outcome is one extra submission, which the key lock turns into a reuse).
    pub fn get(&self, key: &str) -> Option<Entry> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn put(&self, key: &str, entry: &Entry) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            anyhow::anyhow!(
                "creating the Slurm journal folder {}: {e}",
                self.dir.display()
            )
        })?;
        write_json_atomic(&self.path(key), entry)
    }
}
