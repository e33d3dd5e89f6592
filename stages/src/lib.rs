//! emflow's stage kinds, and the registry the `emflow` binary runs with.
//!
//! Each kind lives in its own module under `kinds/`; shared ML machinery (judges, rewards)
//! in its own module; the model layer in the `emflow-model` crate.

pub mod evaluation;
pub mod fetch;
pub mod formats;
pub mod judge;
pub mod kinds;
pub mod report;
pub mod reward;
pub mod serve;
pub mod train;

use emflow_engine::Registry;

/// Every kind and model fetcher this build of emflow knows.
pub fn registry() -> Registry {
    kinds::register(Registry::new()).with_fetcher(fetch::ModelSourceFetcher::default())
}
