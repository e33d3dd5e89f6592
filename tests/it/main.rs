//! End-to-end tests of the `emflow` binary, in one test binary (one link of the whole stack
//! instead of one per file): runs, crashes and reruns, damaged stores, judge cost and judge
//! faults, hostile manifests, the shipped manifests, GPU slots, byte-identical outputs across
//! executors, and the Slurm executor on a local cluster. Shared fixtures live in `support`. A
//! new topic is a file here plus a `mod` line below.

mod cache_cli;
mod crash;
mod datasets_example;
mod faults_store;
mod gpu_slots;
mod judge_cost;
mod judge_faults;
mod manifest_bombs;
mod manifests_plan;
mod rl_bytes_everywhere;
mod safety_public;
mod shared_keys;
mod slurm_executor;
mod support;
