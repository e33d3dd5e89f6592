//! Small hostile manifests ("billion laughs" through aliases or references) make the real
//! binary fail at once, in little memory, with an error at the place that crossed a limit.
//! One test in this file, so that the peak memory of waited-for children is its own.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Instant;

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

/// The peak resident memory of the largest child this process has waited for, in bytes.
fn children_peak_rss() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is valid, writable memory for one rusage; RUSAGE_CHILDREN is a constant.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage failed");
    // SAFETY: getrusage succeeded, so it filled the struct.
    let usage = unsafe { usage.assume_init() };
    // Linux reports kilobytes.
    usage.ru_maxrss as u64 * 1024
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
    for (what, src, at) in cases {
        assert!(src.len() < 1100, "{what}: {} bytes", src.len());
        let path = dir.path().join("bomb.yaml");
        std::fs::write(&path, &src).unwrap();
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_emflow"))
            .arg("--store")
            .arg(dir.path().join("store"))
            .args(["run", "--dry-run"])
            .arg(&path)
            .output()
            .unwrap();
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{what}: refused in {took:?}");
        assert_eq!(out.status.code(), Some(2), "{what}:\n{stderr}");
        assert!(stderr.contains("copy more than"), "{what}:\n{stderr}");
        assert!(
            stderr.contains(&format!("bomb.yaml{at}")),
            "{what}: no location {at}:\n{stderr}"
        );
        // A sanity bound only; the work stops at the budget.
        assert!(took.as_secs() < 20, "{what}: {took:?}");
    }
    let peak = children_peak_rss();
    println!("peak RSS of the largest run: {} MiB", peak >> 20);
    assert!(peak < 100 << 20, "peak RSS {} MiB", peak >> 20);
}
