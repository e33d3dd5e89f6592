//! Signal handling for the driver (Ctrl-C stops the run gracefully, a second one kills the
//! stages) and for `exec-stage` (SIGTERM/SIGUSR2/SIGINT set the stage's interrupt flag, so
//! a checkpointing stage can save and exit with "requeue me").
//!
//! The handler only touches atomics, which is all a signal handler may safely do.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static COUNT: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    COUNT.fetch_add(1, Ordering::SeqCst);
    if let Some(flag) = FLAG.get() {
        flag.store(true, Ordering::SeqCst);
    }
}

/// Installs the handler for `signals` and returns the flag it sets.
pub fn install(signals: &[libc::c_int]) -> Arc<AtomicBool> {
    let flag = FLAG
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
    for &sig in signals {
        // SAFETY: the handler is async-signal-safe (atomics only).
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    flag
}

/// Signals for a driver process.
pub fn install_driver() -> Arc<AtomicBool> {
    install(&[libc::SIGINT, libc::SIGTERM])
}

/// Signals for an `exec-stage` process.
pub fn install_stage() -> Arc<AtomicBool> {
    install(&[libc::SIGINT, libc::SIGTERM, libc::SIGUSR2])
}

/// True once a second signal arrived (the user insists).
pub fn second_interrupt() -> bool {
    COUNT.load(Ordering::SeqCst) >= 2
}
