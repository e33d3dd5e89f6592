//! emflow's engine: manifest model, validation, expansion, DAG, planner, scheduler,
//! executors, run records and the CLI. Stage kinds plug in through [`kind::StageKind`].

pub mod context;
pub mod kind;
pub mod pipeline;

pub use context::{Artifact, DeviceRequest, Interrupted, Memo, Progress, StageContext};
pub use kind::{ArtifactType, KindSpec, ModelFetcher, ParamSpec, ParamType, Params, PortSpec, Registry, StageKind};
