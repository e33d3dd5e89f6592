//! The store's integration tests, in one binary (one link instead of one per file): commits
//! and crashes, garbage collection, locks between processes, and records. Shared fixtures
//! live in `support`. A new topic is a file here plus a `mod` line below.

mod commit;
mod gc;
mod locks;
mod records;
mod support;
