//! The one error type of the store. Every variant names the path involved and says what to
//! do, because the person reading it is a researcher whose run just stopped.

use std::path::PathBuf;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A filesystem call failed.
    #[error("cannot {action} {path}: {source}\n  hint: check that the path exists, is writable by you and that the disk is not full")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A stage key, namespace or run id that cannot be used as a file name.
    #[error("invalid {what} {value:?}: {reason}\n  hint: use 1-128 characters from [A-Za-z0-9_.=-], not starting with '.'")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },

    /// Symbolic links are refused in outputs and hashed folders: what they point at is outside
    /// the store and could change behind its back.
    #[error("{path} is a symbolic link; emflow does not store or hash symlinks\n  hint: copy the file it points to instead of linking it")]
    Symlink { path: PathBuf },

    /// A FIFO, socket or device file where a regular file or folder was expected.
    #[error("{path} is neither a regular file nor a folder\n  hint: write outputs as regular files or folders")]
    UnsupportedFileType { path: PathBuf },

    /// A file name that is not UTF-8 cannot appear in the canonical tree listing.
    #[error("{path} has a file name that is not valid UTF-8\n  hint: rename it; tree digests need UTF-8 names")]
    NonUtf8Name { path: PathBuf },

    /// A JSON file of the store (record, run, memo index) cannot be parsed.
    #[error("{path} is corrupt: {source}\n  hint: delete that file (or run `emflow gc`); the stage it describes will simply run again")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A record that parses but cannot be right (e.g. a digest that is not 64 hex characters).
    #[error("{path} is not a valid record: {reason}\n  hint: delete that file (or run `emflow gc`); the stage it describes will simply run again")]
    InvalidRecord { path: PathBuf, reason: String },

    /// A record written by a newer emflow.
    #[error("{path} uses record schema {found}, this emflow understands up to {supported}\n  hint: upgrade emflow, or point EMFLOW_HOME at a separate store")]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// A value could not be turned into JSON.
    #[error("cannot serialise {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// `commit` was handed the staging folder of another key.
    #[error("staging folder {path} was made for key {staged_for}, not {key}\n  hint: this is a bug in the caller; commit each staging folder under the key it was created for")]
    StagingKeyMismatch {
        path: PathBuf,
        staged_for: String,
        key: String,
    },

    /// `gc` needs the store to itself.
    #[error("the store at {root} is in use by a running emflow process\n  hint: run `emflow gc` again once that run has finished")]
    StoreBusy { root: PathBuf },

    /// A crash injected by a test at a numbered step of a commit (never happens otherwise).
    #[doc(hidden)]
    #[error("simulated crash at commit step {step}")]
    SimulatedCrash { step: u32 },

    /// A file kept changing while it was hashed.
    #[error("{path} changed while it was being hashed, {attempts} times in a row\n  hint: wait until whatever writes it has finished, then run again")]
    Unstable { path: PathBuf, attempts: u32 },
}

impl CacheError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        CacheError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Short form of `.map_err(|e| CacheError::io(action, path, e))`.
pub(crate) trait IoContext<T> {
    fn at(self, action: &'static str, path: &std::path::Path) -> Result<T, CacheError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, action: &'static str, path: &std::path::Path) -> Result<T, CacheError> {
        self.map_err(|e| CacheError::io(action, path, e))
    }
}
