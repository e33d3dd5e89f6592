//! Prints how fast the store hashes: one large file (memory-mapped, all cores), the same
//! file single-threaded, a folder of many small files, and a memoised re-digest.
//!
//! `cargo run --release -p emflow-cache --example hash_throughput [MiB]` (default 256 MiB).

use std::fs;
use std::io::Read;
use std::time::Instant;

use emflow_cache::{hash_file, Store};

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(256);
    let dir = tempfile::tempdir()?;
    let big = dir.path().join("big.bin");
    let chunk: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    {
        let mut data = Vec::with_capacity((mib * 1024 * 1024) as usize);
        for _ in 0..mib {
            data.extend_from_slice(&chunk);
        }
        fs::write(&big, data)?;
    }
    let bytes = mib * 1024 * 1024;

    let t = Instant::now();
    let digest = hash_file(&big)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "hash_file (mmap + rayon, {} threads): {mib} MiB in {secs:.3} s = {:.0} MiB/s",
        rayon::current_num_threads(),
        mib_per_s(bytes, secs)
    );

    let t = Instant::now();
    let mut hasher = blake3::Hasher::new();
    let mut file = fs::File::open(&big)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(hasher.finalize().to_hex().as_str(), digest);
    println!(
        "read + single-thread blake3:        {mib} MiB in {secs:.3} s = {:.0} MiB/s",
        mib_per_s(bytes, secs)
    );

    let store = Store::open(&dir.path().join("store"))?;
    let t = Instant::now();
    store.digest_path(&big)?;
    let first = t.elapsed().as_secs_f64();
    // The memo ignores files touched within its racy window (2 s); backdate the file.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(&big)?
        .set_modified(old)?;
    std::thread::sleep(std::time::Duration::from_millis(2100));
    store.digest_path(&big)?;
    let t = Instant::now();
    store.digest_path(&big)?;
    let memo = t.elapsed().as_secs_f64();
    println!(
        "digest_path: first {first:.3} s, memoised re-digest {:.3} ms",
        memo * 1e3
    );

    let small = dir.path().join("small");
    fs::create_dir(&small)?;
    for i in 0..10_000u32 {
        fs::write(
            small.join(format!("{i:05}.txt")),
            &chunk[..(i as usize % 4096) + 1],
        )?;
    }
    let t = Instant::now();
    store.digest_path(&small)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "digest_path of a folder of 10,000 small files: {secs:.3} s = {:.0} files/s",
        10_000.0 / secs
    );
    Ok(())
}
