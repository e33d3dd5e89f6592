//! Fixtures shared by the engine's integration tests: the small stage kinds and manifest
//! helpers of the front-end tests (`manifest`), and a store in a temporary folder with a run
//! log that test kinds append to, run through the in-process executor (`workdir`).

pub mod manifest;
pub mod workdir;
