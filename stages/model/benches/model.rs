//! `cargo bench -p emflow-model --bench model [-- --model PATH --steps N]`: prints the model
//! layer's throughput figures (see `emflow_model::bench`).

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    emflow_model::bench::bench_model(&args)
}
