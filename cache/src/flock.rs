//! Advisory locks with `flock(2)`. The kernel drops a lock when its holder dies, however it
//! dies, so a lock left by a killed run is simply free: there is no stale-lock cleanup and no
//! `--unlock`. Lock files themselves are never trusted for state; the holder's pid, host and
//! start time are written into them only to tell a waiting user who they wait for.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{CacheError, IoContext};

/// Shared or exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Shared,
    Exclusive,
}

/// Takes a flock on an open file. With `wait == false` returns `Ok(false)` when it is held
/// elsewhere.
pub(crate) fn flock(file: &File, mode: Mode, wait: bool, path: &Path) -> Result<bool, CacheError> {
    let mut op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    };
    if !wait {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            _ => return Err(CacheError::io("lock", path, err)),
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File, CacheError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .at("open lock file", path)
}

/// Takes a lock on `path`, creating the file. Because `gc` may unlink unheld lock files, a
/// lock won on a file that is no longer at `path` is worthless: it is dropped and retried.
pub(crate) fn lock_path(path: &Path, mode: Mode, wait: bool) -> Result<Option<File>, CacheError> {
    loop {
        let file = open_lock_file(path)?;
        if !flock(&file, mode, wait, path)? {
            return Ok(None);
        }
        let held = file.metadata().at("inspect lock file", path)?;
        match fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(Some(file)),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(CacheError::io("inspect lock file", path, e)),
        }
    }
}

/// Who holds a lock, as written by the holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    /// Unix seconds when the lock was taken.
    pub since: u64,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {} since unix time {}",
            self.pid, self.host, self.since
        )
    }
}

/// This machine's name, as lock holders, stage records and run journals name it;
/// `unknown-host` when the system will not say.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn write_holder(file: &mut File, path: &Path) -> Result<(), CacheError> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let line = format!("{} {} {}\n", std::process::id(), hostname(), since);
    file.set_len(0).at("write lock file", path)?;
    file.seek(SeekFrom::Start(0)).at("write lock file", path)?;
    file.write_all(line.as_bytes()).at("write lock file", path)
}

fn parse_holder(text: &str) -> Option<LockHolder> {
    let mut parts = text.split_whitespace();
    let pid = parts.next()?.parse().ok()?;
    let host = parts.next()?.to_string();
    let since = parts.next()?.parse().ok()?;
    Some(LockHolder { pid, host, since })
}

/// The exclusive lock on one stage key; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
    path: PathBuf,
}

impl KeyLock {
    pub(crate) fn acquire(path: PathBuf, wait: bool) -> Result<Option<KeyLock>, CacheError> {
        let Some(mut file) = lock_path(&path, Mode::Exclusive, wait)? else {
            return Ok(None);
        };
        write_holder(&mut file, &path)?;
        Ok(Some(KeyLock { _file: file, path }))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Who holds the lock at `path` now, or `None` if nobody does.
pub(crate) fn current_holder(path: &Path) -> Result<Option<LockHolder>, CacheError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CacheError::io("open lock file", path, e)),
    };
    if flock(&file, Mode::Shared, false, path)? {
        return Ok(None);
    }
    let mut text = String::new();
    file.read_to_string(&mut text).at("read lock file", path)?;
    Ok(Some(parse_holder(&text).unwrap_or(LockHolder {
        pid: 0,
        host: "unknown-host".to_string(),
        since: 0,
    })))
}

/// A shared hold on the whole store: while any exists, `gc` refuses to run. Commits take one
/// for their duration; the engine should hold one for a whole `run`, so that `gc` cannot
/// remove an input a running stage is reading.
#[derive(Debug)]
pub struct StorePin {
    _file: File,
}

impl StorePin {
    pub(crate) fn acquire(path: &Path) -> Result<StorePin, CacheError> {
        let file = open_lock_file(path)?;
        flock(&file, Mode::Shared, true, path)?;
        Ok(StorePin { _file: file })
    }
}

/// The exclusive hold `gc` takes; `None` when the store is pinned by someone.
pub(crate) fn try_exclusive(path: &Path) -> Result<Option<File>, CacheError> {
    let file = open_lock_file(path)?;
    Ok(flock(&file, Mode::Exclusive, false, path)?.then_some(file))
}
