//! The `emflow` binary: the engine's CLI with this build's stage kinds.

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `emflow cache ls | head` would panic writing to a closed pipe;
    // restore the default so the process just ends quietly, as command-line tools do.
    // SAFETY: called before any thread starts; only resets a signal disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // candle asks for its thread count on every CPU matmul and, unless RAYON_NUM_THREADS is
    // set, counts physical cores by reading /proc/cpuinfo each time: 14 % of a SmolLM2 decode
    // step went there. Pin the variable once to what rayon would use anyway.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Before any thread starts, so nothing reads the environment concurrently.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    emflow_engine::cli::main(emflow_stages::registry())
}
