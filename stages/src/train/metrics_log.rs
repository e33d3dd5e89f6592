//! Append-only JSONL logs (`metrics.jsonl`, `rollouts.jsonl`) that survive a resume.
//!
//! Each line is flushed when written, so a crash loses at most the step in flight. A
//! checkpoint copies the logs as they are; a resumed run starts from those copies, so the
//! final files hold every step exactly once whatever happened in between.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

pub struct JsonlLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlLog {
    /// Opens `path` for appending, first replacing it with `resume_from` when given.
    pub fn open(path: &Path, resume_from: Option<&Path>) -> Result<Self> {
        if let Some(src) = resume_from {
            std::fs::copy(src, path).with_context(|| {
                format!(
                    "restoring {} from checkpoint {}",
                    path.display(),
                    src.display()
                )
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening log {}", path.display()))?;
        Ok(JsonlLog {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub fn append(&mut self, record: &impl Serialize) -> Result<()> {
        serde_json::to_writer(&mut self.out, record).context("serialising a log record")?;
        self.out.write_all(b"\n")?;
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
