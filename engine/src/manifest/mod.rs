//! Reading a manifest: source texts, YAML with locations, and the manifest's raw shape.
//!
//! Nothing here resolves references or knows stage kinds; that is [`crate::expand`]'s job.
//! The split keeps the format (what a manifest may contain) apart from its meaning (what a
//! manifest expands to), so that each can be tested on its own.

pub mod raw;
pub mod source;
pub mod yaml;

pub use source::SourceMap;
pub use yaml::{Map, Node, Value};
