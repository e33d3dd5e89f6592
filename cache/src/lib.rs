//! emflow's content-addressed store.
//!
//! Layout under the store root:
//!
//! ```text
//! objects/ab/<digest>      committed files (read-only), named by blake3 of their bytes
//! trees/ab/<digest>/       committed folders (read-only), named by their canonical tree digest
//! records/<key>.json       one record per stage key, written last: the commit point
//! stage-index/<h>.json     the latest key of each stage instance (a hint for `status`)
//! memo/<namespace>/..      memoised expensive calls (judge verdicts)
//! filememo/<h>.json        digests of users' large files, keyed by their full stamp
//! locks/<key>.lock         per-key flock locks; `locks/.store` is the gc/run lock
//! tmp/                     staging folders and temporary files (same filesystem: renames)
//! checkpoints/<key>/       resumable state of interrupted stages
//! runs/<id>.json           run journals written by the engine
//! ```
//!
//! Why so: every change becomes visible by one `rename(2)`, so a `kill -9` at any instant
//! leaves either the old state or the new one; locks are `flock(2)`, which the kernel frees
//! when a process dies, so nobody ever has to unlock by hand; content is named by digest, so
//! identical outputs of different stages are stored once and an upstream rerun that yields
//! the same bytes is recognised as unchanged.

mod dirpool;
mod error;
mod filememo;
mod flock;
mod fsutil;
mod gc;
mod hash;
mod memo;
mod record;
mod store;
mod verify;

pub use error::CacheError;
pub use flock::{hostname, KeyLock, LockHolder, StorePin};
pub use gc::{AreaSize, GcOptions, GcReport, StoreSize};
pub use hash::{hash_file, Digest};
pub use record::{EntryKind, OutputEntry, StageRecord, RECORD_SCHEMA};
pub use store::{digest_bytes, Scratch, Staging, Store, StoreOptions};
pub use verify::{AuditReport, Damage, DamagedBlob, DamagedOutput};
