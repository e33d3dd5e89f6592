//! The `emflow` binary: the engine's CLI with this build's stage kinds.

fn main() -> std::process::ExitCode {
    let _registry = emflow_stages::registry();
    std::process::ExitCode::SUCCESS
}
