//! emflow's engine: manifest model, validation, expansion, DAG, planner, scheduler,
//! executors, run records and the CLI. Stage kinds plug in through [`kind::Kind`]
//! (typed params) or the object-safe [`kind::StageKind`] the engine calls.

pub mod artifact;
pub mod cli;
pub mod commands;
pub mod console;
pub mod context;
pub mod dag;
pub mod diagnostics;
pub mod executor;
pub mod expand;
pub mod host;
pub mod job;
pub mod judge_cost;
pub mod keys;
pub mod kind;
mod loader;
pub mod lockfile;
pub mod manifest;
pub mod memory;
pub mod pipeline;
pub mod plan;
pub mod scheduler;
pub mod signals;
pub mod slots;

pub use context::{Artifact, DeviceRequest, Interrupted, Memo, Progress, StageContext};
pub use kind::{
    ArtifactType, JudgeEstimate, Kind, KindInfo, KindSpec, ModelFetcher, ParamSpec, ParamType,
    Params, PlanInput, PlanInputs, PortSpec, Precision, Registry, StageKind,
};
