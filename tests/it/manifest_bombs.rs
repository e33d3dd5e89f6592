//! Small hostile manifests ("billion laughs" through aliases or references) make the real
//! binary fail at once, in little memory, with an error at the place that crossed a limit.

use std::fmt::Write as _;
use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::support::emflow;

/// Nine levels of nine copies each: `a` holds `first`, every later level lists `item` nine
/// times with `@` standing for the level before (as an alias or a reference).
fn bomb(first: &str, item: &str) -> String {
    let mut s = format!("emflow: 1\nparams:\n  a: &a {first}\n");
    for (prev, name) in "abcdefgh".chars().zip("bcdefghi".chars()) {
        let one = item.replace('@', &prev.to_string());
        let items = vec![one; 9].join(", ");
        let _ = writeln!(s, "  {name}: &{name} [{items}]");
    }
    s.push_str("stages:\n  s: {kind: command, params: {run: 'true', outputs: {o: file}}}\n");
    s
}

/// Runs `cmd` to its end: its exit code, its stderr and its own peak resident memory in
/// bytes. Reaped with `wait4`, which reports that one child's usage: the tests of this
/// binary share one process, so `getrusage(RUSAGE_CHILDREN)` would report the largest child
/// of any of them (a training run's, say).
// Clippy cannot see that wait4 reaps the child.
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> (Option<i32>, String, u64) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    loop {
        // SAFETY: `status` and `usage` are valid, writable; `pid` is our unreaped child.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, usage.as_mut_ptr()) };
        if rc == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "wait4: {err}");
    }
    // SAFETY: wait4 returned the child, so it filled the struct.
    let usage = unsafe { usage.assume_init() };
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    // Linux reports kilobytes.
    (code, stderr, usage.ru_maxrss as u64 * 1024)
}

#[test]
fn alias_and_reference_bombs_fail_fast_small_and_located() {
    let lol = ["\"lol\""; 9].join(", ");
    let cases = [
        ("aliases", bomb(&format!("[{lol}]"), "*@"), ":8:18"),
        (
            "aliases of long strings",
            bomb(&format!("\"{}\"", "x".repeat(400)), "*@"),
            ":8:10",
        ),
        // 141,156 values copied through `f`; the third `${f}` in `g` crosses 500,000.
        ("references", bomb("[lol]", "\"${@}\""), ":9:27"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut peak = 0;
    for (what, src, at) in cases {
        assert!(src.len() < 1100, "{what}: {} bytes", src.len());
        let path = dir.path().join("bomb.yaml");
        std::fs::write(&path, &src).unwrap();
        let started = Instant::now();
        let (code, stderr, rss) = run_measured(
            emflow()
                .arg("--store")
                .arg(dir.path().join("store"))
                .args(["run", "--dry-run"])
                .arg(&path),
        );
        let took = started.elapsed();
        peak = peak.max(rss);
        println!("{what}: refused in {took:?}");
        assert_eq!(code, Some(2), "{what}:\n{stderr}");
        assert!(stderr.contains("copy more than"), "{what}:\n{stderr}");
        assert!(
            stderr.contains(&format!("bomb.yaml{at}")),
            "{what}: no location {at}:\n{stderr}"
        );
        // A sanity bound only; the work stops at the budget.
        assert!(took.as_secs() < 20, "{what}: {took:?}");
    }
    println!("peak RSS of the largest run: {} MiB", peak >> 20);
    assert!(peak < 100 << 20, "peak RSS {} MiB", peak >> 20);
}
