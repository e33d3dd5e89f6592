//! Small filesystem primitives the store is built from: durable atomic writes, unique
//! temporary names, read-only marking and removal of read-only trees.
//!
//! Durability follows the usual POSIX recipe: write a temporary file in the same filesystem,
//! fsync it, rename it over the target, fsync the parent folder. After a crash the target is
//! either the old file or the new one, never a torn mix.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{CacheError, IoContext};

/// A name no other call in any process will produce: pid, time and a process-wide counter.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{}-{}", std::process::id(), nanos, n)
}

/// Checks that `value` can be used as one path component in the store.
pub(crate) fn check_name(what: &'static str, value: &str) -> Result<(), CacheError> {
    let bad = |reason| {
        Err(CacheError::InvalidName {
            what,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() || value.len() > 128 {
        return bad("it must be 1 to 128 characters long");
    }
    if value.starts_with('.') {
        return bad("it must not start with '.'");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'=' | b'-'))
    {
        return bad("it contains a character other than [A-Za-z0-9_.=-]");
    }
    Ok(())
}

/// fsync a folder so that renames and unlinks inside it survive a power cut.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), CacheError> {
    let f = File::open(dir).at("open folder", dir)?;
    f.sync_all().at("fsync folder", dir)
}

/// Writes `bytes` to `target` atomically and durably. `tmp_dir` must be on the same
/// filesystem; the temporary file is named so that `open`/`gc` can tell its owner.
pub(crate) fn atomic_write(tmp_dir: &Path, target: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let tmp = write_tmp(tmp_dir, bytes, true)?;
    rename_into_place(&tmp, target, true)
}

/// Writes `bytes` to a fresh temporary file in `tmp_dir` (fsynced when `durable`).
pub(crate) fn write_tmp(
    tmp_dir: &Path,
    bytes: &[u8],
    durable: bool,
) -> Result<PathBuf, CacheError> {
    let tmp = tmp_dir.join(format!("write-{}", unique_suffix()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .at("create", &tmp)?;
        f.write_all(bytes).at("write", &tmp)?;
        if durable {
            f.sync_all().at("fsync", &tmp)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Renames a temporary file over `target` (then fsyncs the folder when `durable`).
pub(crate) fn rename_into_place(
    tmp: &Path,
    target: &Path,
    durable: bool,
) -> Result<(), CacheError> {
    if let Err(e) = fs::rename(tmp, target) {
        let _ = fs::remove_file(tmp);
        return Err(CacheError::io("rename into place", target, e));
    }
    if durable {
        if let Some(parent) = target.parent() {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

/// Reads a file, `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, CacheError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CacheError::io("read", path, e)),
    }
}

/// Creates `dir` and its parents; fine if it exists.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), CacheError> {
    fs::create_dir_all(dir).at("create folder", dir)
}

/// Removes a file; fine if it is already gone.
pub(crate) fn remove_file_if_present(path: &Path) -> Result<bool, CacheError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(CacheError::io("remove", path, e)),
    }
}

/// Removes a file or a whole tree, first giving write permission back to folders that the
/// store made read-only. Fine if `path` is already gone.
pub(crate) fn remove_all(path: &Path) -> Result<(), CacheError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CacheError::io("inspect", path, e)),
    };
    if !meta.is_dir() {
        return remove_file_if_present(path).map(|_| ());
    }
    make_writable_dirs(path)?;
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        // Another cleaner removed (part of) it at the same time: the goal is reached.
        Err(_) if fs::symlink_metadata(path).is_err() => Ok(()),
        Err(e) => Err(CacheError::io("remove folder", path, e)),
    }
}

/// Removes everything inside `dir`, keeping `dir` itself.
pub(crate) fn remove_children(dir: &Path) -> Result<(), CacheError> {
    for child in list_dir(dir)? {
        remove_all(&child)?;
    }
    Ok(())
}

fn make_writable_dirs(dir: &Path) -> Result<(), CacheError> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CacheError::io("inspect", dir, e)),
    };
    if !meta.is_dir() {
        return Ok(());
    }
    if meta.mode() & 0o700 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).at("make writable", dir)?;
    }
    let entries = match fs::read_dir(dir) {
        Ok(it) => it,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CacheError::io("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.at("list", dir)?;
        if entry.file_type().at("inspect", &entry.path())?.is_dir() {
            make_writable_dirs(&entry.path())?;
        }
    }
    Ok(())
}

/// Swaps two paths in one step (`renameat2(RENAME_EXCHANGE)`): both keep existing
/// throughout, so a reader sees either the old entry or the new one, never neither. Used to
/// replace a damaged folder, which plain `rename` cannot do over a non-empty target.
pub(crate) fn exchange(a: &Path, b: &Path) -> Result<(), CacheError> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| CacheError::io("swap", p, std::io::Error::other("path has a NUL byte")))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(CacheError::io("swap", b, std::io::Error::last_os_error()))
    }
}

/// Sets a file's permission bits.
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), CacheError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at("set permissions of", path)
}

/// Whether a process with this pid exists on this host (signal 0 probes without signalling).
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 performs only the permission and existence checks.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Total bytes and file count below `path` (a file counts itself).
pub(crate) fn disk_usage(path: &Path) -> Result<(u64, u64), CacheError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(CacheError::io("inspect", path, e)),
    };
    if !meta.is_dir() {
        return Ok((meta.len(), 1));
    }
    let (mut bytes, mut files) = (0, 0);
    for entry in fs::read_dir(path).at("list", path)? {
        let entry = entry.at("list", path)?;
        let (b, f) = disk_usage(&entry.path())?;
        bytes += b;
        files += f;
    }
    Ok((bytes, files))
}

/// Entries of a folder as paths, sorted; empty when the folder does not exist.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    let entries = match fs::read_dir(dir) {
        Ok(it) => it,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CacheError::io("list", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        out.push(entry.at("list", dir)?.path());
    }
    out.sort();
    Ok(out)
}

/// The file name of a path as UTF-8, or `None`.
pub(crate) fn file_name(path: &Path) -> Option<&str> {
    path.file_name().and_then(|n| n.to_str())
}

/// The store name a listed file stands for: its file name less `suffix` (`<key>.json` ->
/// `<key>`; `""` for none), when it has that suffix and the rest passes [`check_name`] as a
/// `what`. `None` for anything else found in the folder.
pub(crate) fn stored_name<'p>(path: &'p Path, suffix: &str, what: &'static str) -> Option<&'p str> {
    let name = file_name(path)?.strip_suffix(suffix)?;
    check_name(what, name).ok().map(|()| name)
}
