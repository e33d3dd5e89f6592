//! What the store remembers about one executed stage key. The record is written last in a
//! commit, so its presence is the proof that every output it names is in the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hash::Digest;

/// The record format version this build writes and the newest it reads.
pub const RECORD_SCHEMA: u32 = 1;

/// Whether an output is one file (a blob) or a folder (a tree).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Tree,
}

/// One committed output of a stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OutputEntry {
    pub digest: Digest,
    pub kind: EntryKind,
    /// Bytes of the file, or the sum of the files of the tree.
    pub size: u64,
}

/// Everything known about one successful execution of a stage key.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct StageRecord {
    /// Record format version ([`RECORD_SCHEMA`] when written by this build).
    pub schema: u32,
    pub key: String,
    /// The stage instance, e.g. `grpo[seed=1]`.
    pub stage_id: String,
    pub kind: String,
    /// The named parts the key was computed from (filled by the engine; explains staleness).
    pub key_parts: serde_json::Value,
    /// Output name -> committed content.
    pub outputs: BTreeMap<String, OutputEntry>,
    /// Headline figures the stage reported.
    pub summary: serde_json::Map<String, serde_json::Value>,
    pub started_at: String,
    pub finished_at: String,
    pub duration_s: f64,
    pub peak_rss_bytes: u64,
    pub host: String,
    pub engine_version: String,
}
