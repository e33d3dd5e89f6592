//! The `emflow` binary: the engine's CLI with this build's stage kinds.

fn main() -> std::process::ExitCode {
    emflow_engine::cli::main(emflow_stages::registry())
}
