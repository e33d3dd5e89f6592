//! The read-mostly commands over a planned pipeline, one file each: `status` and `plan`
//! (`status.rs`), `graph`, `lock` and `check` (`lock.rs`), `verify`, `gc`,
//! `cache ls|show|path|verify` (`inspect.rs`), `export` and the run's results folder (`export.rs`); `kinds` lives with the kind contract (`kind/listing.rs`). Each is a function returning what it
//! found, so tests call them directly and the CLI only maps results to exit codes.

mod export;
mod gc;
mod graph;
mod inspect;
mod lock;
mod status;
mod verify;

use std::path::{Path, PathBuf};

use crate::job::error_chain;

pub use export::{
    export, export_record, loadable_base, natural_name, remove_path, results_dir, Exported,
};
pub use gc::gc;
pub use graph::{graph, GraphFormat};
pub use inspect::{cache_lookup, cache_ls, cache_verify, record_json};
pub use lock::{check, lock, Mismatch};
pub use status::{plan, status};
pub use verify::{verify, Verification};

/// Where the store is: `--store`, else `EMFLOW_HOME`, else `.emflow/` next to the manifest.
pub fn store_location(flag: Option<&Path>, manifest: Option<&Path>) -> PathBuf {
    let chosen = if let Some(p) = flag {
        p.to_path_buf()
    } else if let Some(home) = std::env::var_os("EMFLOW_HOME").filter(|v| !v.is_empty()) {
        PathBuf::from(home)
    } else {
        match manifest.and_then(|m| m.parent()) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(".emflow"),
            _ => PathBuf::from(".emflow"),
        }
    };
    // Absolute, because stages run in other working directories and read artifacts
    // by the paths derived from it.
    std::path::absolute(&chosen).unwrap_or(chosen)
}

/// Formats a failed command's error for the terminal.
pub fn describe_error(err: &anyhow::Error) -> String {
    error_chain(err)
}
