//! The engine's integration tests, in one binary (one link instead of one per file): the
//! manifest front end (expansion, diagnostics, hostile input), runs on a real store through
//! the in-process executor, and judge-cost planning. Shared fixtures live in `support`. A new
//! topic is a file here plus a `mod` line below.

mod engine_run;
mod faults_manifest;
mod judge_cost;
mod kind_params;
mod manifest_diagnostics;
mod manifest_expand;
mod support;
