//! The `emflow` binary: the engine's CLI with this build's stage kinds.

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `emflow cache ls | head` would panic writing to a closed pipe;
    // restore the default so the process just ends quietly, as command-line tools do.
    // SAFETY: called before any thread starts; only resets a signal disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    emflow_engine::cli::main(emflow_stages::registry())
}
