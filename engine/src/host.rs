//! Small facts about the machine and the clock that records and run files carry:
//! UTC timestamps, the host name, peak memory, usable cores and GPUs, and [`ExitWatch`] for
//! waiting on a child process. Kept here so the engine needs no date or system-info crate
//! for a few functions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Defined once, in the store, whose lock files name their holder's host.
pub use emflow_cache::hostname;

/// `2026-11-27T13:05:09Z` for `t` (UTC, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// A run id that sorts by time and is unique across processes: `20261127T130509Z-4f2a91`.
pub fn new_run_id() -> String {
    let now = SystemTime::now();
    let stamp: String = rfc3339(now)
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let nanos = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let salt =
        blake3::hash(format!("{}:{}:{nanos}", std::process::id(), hostname()).as_bytes()).to_hex();
    format!("{stamp}-{}", &salt[..6])
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Peak resident memory in bytes of this process and of its waited-for children,
/// whichever is larger (a `command` stage's work happens in a child).
pub fn peak_rss_bytes() -> u64 {
    let get = |who| {
        // SAFETY: rusage is plain data; getrusage fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut usage) } == 0 {
            (usage.ru_maxrss.max(0) as u64) * 1024
        } else {
            0
        }
    };
    get(libc::RUSAGE_SELF).max(get(libc::RUSAGE_CHILDREN))
}

/// Cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// GPU ids stages may be given, as `CUDA_VISIBLE_DEVICES` entries: the inherited
/// `CUDA_VISIBLE_DEVICES` if set (an empty value means none), otherwise one per NVIDIA GPU
/// the driver lists, otherwise none. `EMFLOW_GPUS` (a count) overrides detection.
pub fn visible_gpus() -> Vec<String> {
    if let Some(n) = std::env::var("EMFLOW_GPUS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return (0..n).map(|i| i.to_string()).collect();
    }
    if let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty() && !s.starts_with('-'))
            .map(String::from)
            .collect();
    }
    match std::fs::read_dir("/proc/driver/nvidia/gpus") {
        Ok(entries) => (0..entries.count()).map(|i| i.to_string()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Memory of the smallest GPU the driver reports (`nvidia-smi`), in bytes; `None` without
/// an NVIDIA driver. What the plan's memory check uses when a stage declares no
/// `gpu_memory`.
pub fn gpu_memory() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .min()
        .map(|mib| mib << 20)
}

/// Human size: `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Lets a thread sleep until a child process exits, without reaping it: a pidfd (Linux 5.3+)
/// becomes readable at exit and names that very process, so a reused pid cannot fool it.
/// A trivial stage's command ends within a millisecond or two; the fixed 20 ms sleeps and
/// 100 ms scheduler ticks this replaces made each such stage cost 20-120 ms (issue 22).
/// Where pidfds are not available, [`ExitWatch::wait`] just sleeps its timeout.
pub struct ExitWatch {
    fd: Option<std::os::fd::OwnedFd>,
}

impl ExitWatch {
    pub fn new(pid: libc::pid_t) -> ExitWatch {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0).map(|fd| {
            // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        });
        ExitWatch { fd }
    }

    /// Returns when the child has exited or after `timeout`, whichever comes first.
    pub fn wait(&self, timeout: Duration) {
        use std::os::fd::AsRawFd;
        let Some(fd) = &self.fd else {
            std::thread::sleep(timeout);
            return;
        };
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd we own; the result only says whether to look again.
        unsafe {
            libc::poll(&mut poll, 1, ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)),
            "2000-02-29T01:01:01Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_798_761_599)),
            "2026-12-31T23:59:59Z"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
