//! Adapter snapshots at set fractions of a training run (`snapshot_fractions` of `sft` and
//! `rl`), so that an `eval` stage can measure emergent misalignment over training.
//!
//! A fraction `f` of a run of `total` steps is the snapshot after step
//! `round(f x total)` (at least 1, at most `total`). Each snapshot is written into the
//! stage's checkpoint folder the moment its step ends, under a temporary name renamed into
//! place, so it survives an interruption: a resumed run finds the snapshots taken before
//! its checkpoint and takes only the later ones (a snapshot written after the last
//! checkpoint is written again, with the same bytes, when its step is replayed). At the end
//! [`Snapshots::publish`] copies them into the stage's `snapshots` output:
//!
//! ```text
//! snapshots/index.json      {"schema": "emflow.snapshots/1", "steps_total": N, "snapshots":
//!                            [{"fraction", "step", "samples_consumed", "adapter"}], "not_reached": [f]}
//! snapshots/step-000094/    the adapter after step 94 (PEFT layout, or full weights)
//! ```
//!
//! `steps_total` is the steps the run actually took: an early stop ends a run before its
//! later fractions, which are then listed under `not_reached` instead of being faked.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::checkpoint::copy_dir;

/// The index's schema name; `eval` refuses a folder without it.
pub const SNAPSHOTS_SCHEMA: &str = "emflow.snapshots/1";
/// The index file inside a `snapshots` output.
pub const INDEX: &str = "index.json";

/// One snapshot as the index lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The fraction of training asked for.
    pub fraction: f64,
    /// Steps done when it was taken (RL steps for `rl`, optimizer steps for `sft`).
    pub step: u64,
    /// Examples (`sft`) or prompts (`rl`) consumed by then.
    pub samples_consumed: u64,
    /// Its folder, relative to the index.
    pub adapter: String,
}

/// The `index.json` of a `snapshots` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotIndex {
    pub schema: String,
    /// Steps the run took in all (the final adapter is after this many).
    pub steps_total: u64,
    pub snapshots: Vec<SnapshotEntry>,
    /// Fractions the run never reached (it stopped early).
    pub not_reached: Vec<f64>,
}

impl SnapshotIndex {
    /// Reads and checks the index of the `snapshots` folder `dir` (`origin` names it in errors).
    pub fn read(dir: &Path, origin: &str) -> Result<SnapshotIndex> {
        let path = dir.join(INDEX);
        let text = fs::read_to_string(&path).with_context(|| {
            format!("{origin}: no {INDEX}; wire the `snapshots` output of an sft or rl stage")
        })?;
        let index: SnapshotIndex = serde_json::from_str(&text)
            .with_context(|| format!("{origin}/{INDEX} is not a snapshot index"))?;
        ensure!(
            index.schema == SNAPSHOTS_SCHEMA,
            "{origin}/{INDEX} has schema `{}`, expected `{SNAPSHOTS_SCHEMA}`",
            index.schema
        );
        Ok(index)
    }
}

/// The most snapshots a training stage with `params` (expanded, defaults filled) takes: one
/// per `snapshot_fractions` entry (an early stop takes fewer). `None` for params without the
/// list (not an `sft` or `rl` stage). Lets the plan count an `eval` over `snapshots` before
/// its training stage has run.
pub fn planned_count(params: &serde_json::Map<String, serde_json::Value>) -> Option<u64> {
    let fractions = params.get("snapshot_fractions")?.as_array()?;
    Some(fractions.len() as u64)
}

/// Checks `snapshot_fractions`: each strictly between 0 and 1, in increasing order.
pub fn check_fractions(fractions: &[f64]) -> Result<()> {
    for f in fractions {
        ensure!(
            f.is_finite() && *f > 0.0 && *f < 1.0,
            "snapshot_fractions: {f} is not between 0 and 1 (exclusive); the final adapter is the 100 % point and the base model the 0 % point"
        );
    }
    ensure!(
        fractions.windows(2).all(|w| w[0] < w[1]),
        "snapshot_fractions must increase, each once: {fractions:?}"
    );
    Ok(())
}

/// The snapshots one run takes: where they go while it trains, and at which steps.
pub struct Snapshots {
    root: PathBuf,
    /// (fraction, step) in increasing order.
    due: Vec<(f64, u64)>,
}

fn step_dir(step: u64) -> String {
    format!("step-{step:06}")
}

impl Snapshots {
    /// The snapshots at `fractions` of a run of `total_steps`, kept under `root` (a folder in
    /// the stage's checkpoint folder) until published.
    pub fn plan(root: PathBuf, fractions: &[f64], total_steps: u64) -> Snapshots {
        let due = fractions
            .iter()
            .map(|f| {
                let step = (f * total_steps as f64).round() as u64;
                (*f, step.clamp(1, total_steps.max(1)))
            })
            .collect();
        Snapshots { root, due }
    }

    /// Whether a snapshot is due after `step` steps.
    pub fn due_after(&self, step: u64) -> bool {
        self.due.iter().any(|(_, s)| *s == step)
    }

    /// Takes the snapshot due after `step` (when one is): `write` saves the adapter into the
    /// folder it is given, which then replaces any earlier copy at once.
    pub fn take(
        &self,
        step: u64,
        samples_consumed: u64,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        if !self.due_after(step) {
            return Ok(());
        }
        let name = step_dir(step);
        let tmp = self.root.join(format!(".{name}.writing"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)
            .with_context(|| format!("creating snapshot folder {}", tmp.display()))?;
        write(&tmp.join("adapter"))
            .with_context(|| format!("saving the snapshot after step {step}"))?;
        fs::write(tmp.join("samples_consumed"), samples_consumed.to_string())?;
        let dest = self.root.join(&name);
        if dest.exists() {
            fs::remove_dir_all(&dest)?;
        }
        fs::rename(&tmp, &dest).with_context(|| format!("publishing snapshot {}", dest.display()))
    }

    /// Writes the `snapshots` output into `out`: every snapshot taken (each step's adapter
    /// once, however many fractions fell on it) and the index, for a run of `steps_total`.
    pub fn publish(&self, out: &Path, steps_total: u64) -> Result<()> {
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let mut index = SnapshotIndex {
            schema: SNAPSHOTS_SCHEMA.into(),
            steps_total,
            snapshots: Vec::new(),
            not_reached: Vec::new(),
        };
        for &(fraction, step) in &self.due {
            let name = step_dir(step);
            let taken = self.root.join(&name);
            if step > steps_total || !taken.is_dir() {
                index.not_reached.push(fraction);
                continue;
            }
            if !out.join(&name).exists() {
                copy_dir(&taken.join("adapter"), &out.join(&name))?;
            }
            let consumed = fs::read_to_string(taken.join("samples_consumed"))
                .with_context(|| format!("reading {}", taken.display()))?;
            index.snapshots.push(SnapshotEntry {
                fraction,
                step,
                samples_consumed: consumed.trim().parse().with_context(|| {
                    format!("{}: samples_consumed is not a number", taken.display())
                })?,
                adapter: name,
            });
        }
        let text = serde_json::to_string_pretty(&index)? + "\n";
        fs::write(out.join(INDEX), text).context("writing the snapshot index")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_adapter(tag: &str) -> impl FnOnce(&Path) -> Result<()> + '_ {
        move |dir: &Path| {
            fs::create_dir_all(dir)?;
            fs::write(dir.join("adapter_model.safetensors"), tag)?;
            Ok(())
        }
    }

    #[test]
    fn fractions_map_to_steps_and_are_checked() {
        let s = Snapshots::plan(PathBuf::new(), &[0.25, 0.5, 0.75], 374);
        assert_eq!(s.due, [(0.25, 94), (0.5, 187), (0.75, 281)]);
        // A tiny run: never step 0, never past the end.
        let s = Snapshots::plan(PathBuf::new(), &[0.1, 0.9], 2);
        assert_eq!(s.due, [(0.1, 1), (0.9, 2)]);
        assert!(check_fractions(&[0.25, 0.5]).is_ok());
        for bad in [
            vec![0.0],
            vec![1.0],
            vec![0.5, 0.5],
            vec![0.6, 0.3],
            vec![f64::NAN],
        ] {
            assert!(check_fractions(&bad).is_err(), "{bad:?}");
        }
    }

    /// A run interrupted after its first snapshot and resumed (a new plan over the same
    /// folder) publishes both; a fraction past an early stop is listed as not reached.
    #[test]
    fn snapshots_survive_a_restart_and_early_stops_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ckpt/snapshots");
        let first = Snapshots::plan(root.clone(), &[0.25, 0.5, 0.75], 8);
        for step in 1..=3 {
            first.take(step, step * 4, fake_adapter("a")).unwrap();
        }
        // A torn write from the crash is ignored and replaced.
        fs::create_dir_all(root.join(".step-000004.writing")).unwrap();
        let resumed = Snapshots::plan(root.clone(), &[0.25, 0.5, 0.75], 8);
        for step in 3..=5 {
            resumed.take(step, step * 4, fake_adapter("b")).unwrap();
        }
        let out = dir.path().join("out");
        resumed.publish(&out, 5).unwrap();
        let index = SnapshotIndex::read(&out, "out").unwrap();
        assert_eq!(index.steps_total, 5);
        assert_eq!(index.not_reached, [0.75]);
        let got: Vec<(u64, u64, &str)> = index
            .snapshots
            .iter()
            .map(|e| (e.step, e.samples_consumed, e.adapter.as_str()))
            .collect();
        assert_eq!(got, [(2, 8, "step-000002"), (4, 16, "step-000004")]);
        let bytes = |s: &str| fs::read_to_string(out.join(s).join("adapter_model.safetensors"));
        assert_eq!(bytes("step-000002").unwrap(), "a");
        assert_eq!(bytes("step-000004").unwrap(), "b");
        assert!(!out.join("step-000006").exists());
    }
}
