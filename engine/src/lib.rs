//! emflow's engine: manifest model, validation, expansion, DAG, planner, scheduler,
//! executors, run records and the CLI. Stage kinds plug in through [`kind::StageKind`].

pub mod cli;
pub mod commands;
pub mod context;
pub mod diagnostics;
pub mod expand;
pub mod dag;
pub mod executor;
pub mod host;
pub mod job;
pub mod keys;
pub mod kind;
pub mod manifest;
mod loader;
pub mod lockfile;
pub mod pipeline;
pub mod plan;
pub mod report;
pub mod run;
pub mod signals;
pub mod slots;

pub use context::{Artifact, DeviceRequest, Interrupted, Memo, Progress, StageContext};
pub use kind::{ArtifactType, KindSpec, ModelFetcher, ParamSpec, ParamType, Params, PortSpec, Registry, StageKind};
