//! emflow's stage kinds, and the registry the `emflow` binary runs with.
//!
//! Each kind lives in its own module under `kinds/`; shared ML machinery (judges, rewards)
//! in its own module; the model layer in the `emflow-model` crate.

pub mod evaluation;
pub mod fetch;
pub mod formats;
pub mod judge;
pub mod kinds;
pub mod onpolicy;
pub mod report_html;
pub mod reward;
pub mod sampling;
pub mod serve;
pub mod train;

use emflow_engine::Registry;

/// Every kind and model fetcher this build of emflow knows.
pub fn registry() -> Registry {
    kinds::register(Registry::new())
        .with_fetcher(fetch::ModelSourceFetcher::default())
        .with_bench("model", "SmolLM2 on this machine: prefill, decode (batch 1 and 16), LoRA and full training tokens/s, peak memory", emflow_model::bench::bench_model)
        .with_command("serve", "serve a local model over an OpenAI-compatible API", serve::serve_command)
}
