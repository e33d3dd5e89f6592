//! Crash-safe checkpoints inside a stage's checkpoint folder.
//!
//! A checkpoint is a directory written in full under a temporary name and then swapped in
//! by renames, so a `kill -9` at any instant leaves either the previous checkpoint or the
//! new one, never a torn one:
//! `current` is the live checkpoint; while swapping, the old one is parked as `previous`
//! (used if the crash came between the two renames). What goes inside is the caller's
//! business (adapter, optimizer moments, `state.json` with step and data position, copies
//! of the logs); [`save_state`] and [`load_state`] handle the JSON part.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};

const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const WRITING: &str = "writing";
const STATE: &str = "state.json";

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Option<PathBuf> {
    [CURRENT, PREVIOUS]
        .iter()
        .map(|name| root.join(name))
        .find(|dir| dir.join(STATE).is_file())
}

/// Writes a new checkpoint: `fill` populates a fresh folder, which then replaces the
/// current checkpoint atomically. `fill` must write `state.json` (via [`save_state`]) last.
pub fn save(root: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    fs::create_dir_all(root)
        .with_context(|| format!("creating checkpoint folder {}", root.display()))?;
    let writing = root.join(WRITING);
    if writing.exists() {
        fs::remove_dir_all(&writing)
            .with_context(|| format!("clearing torn checkpoint {}", writing.display()))?;
    }
    fs::create_dir(&writing)?;
    fill(&writing).with_context(|| format!("writing checkpoint into {}", writing.display()))?;
    let current = root.join(CURRENT);
    let previous = root.join(PREVIOUS);
    if previous.exists() {
        fs::remove_dir_all(&previous)?;
    }
    if current.exists() {
        fs::rename(&current, &previous)?;
    }
    fs::rename(&writing, &current)
        .with_context(|| format!("publishing checkpoint {}", current.display()))?;
    if previous.exists() {
        fs::remove_dir_all(&previous)?;
    }
    Ok(current)
}

pub fn save_state(dir: &Path, state: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(state)?;
    fs::write(dir.join(STATE), bytes)
        .with_context(|| format!("writing {}", dir.join(STATE).display()))
}

pub fn load_state<T: DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join(STATE);
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "checkpoint state {} does not parse; delete the stage's checkpoint folder to start over",
            path.display()
        )
    })
}

/// Replaces `dest` (a folder) by a copy of `src`, via a temporary sibling and a rename.
pub fn replace_dir_atomically(src: &Path, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    copy_dir(src, &tmp)?;
    if dest.exists() {
        fs::remove_dir_all(dest)?;
    }
    fs::rename(&tmp, dest).with_context(|| format!("publishing {}", dest.display()))
}

/// Recursive copy of a folder of plain files.
pub fn copy_dir(src: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let target = dest.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target).with_context(|| {
                format!("copying {} to {}", entry.path().display(), target.display())
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_complete_checkpoint_wins_and_torn_ones_are_ignored() {
        let root = tempfile::tempdir().unwrap();
        assert!(latest(root.path()).is_none());
        save(root.path(), |d| save_state(d, &1u32)).unwrap();
        save(root.path(), |d| save_state(d, &2u32)).unwrap();
        let dir = latest(root.path()).unwrap();
        assert_eq!(load_state::<u32>(&dir).unwrap(), 2);
        // A crash while writing leaves a folder without state.json: ignored.
        fs::create_dir_all(root.path().join(WRITING)).unwrap();
        assert_eq!(load_state::<u32>(&latest(root.path()).unwrap()).unwrap(), 2);
        // A crash between the renames leaves only `previous`: still found.
        fs::rename(root.path().join(CURRENT), root.path().join(PREVIOUS)).unwrap();
        assert_eq!(load_state::<u32>(&latest(root.path()).unwrap()).unwrap(), 2);
        // And the next save recovers from that state.
        save(root.path(), |d| save_state(d, &3u32)).unwrap();
        assert_eq!(load_state::<u32>(&latest(root.path()).unwrap()).unwrap(), 3);
    }
}
