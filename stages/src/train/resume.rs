//! What lets a training kind stop and resume bit for bit: the deterministic data order (a
//! [`Cursor`] whose position is one number) and checkpoints of weights + optimizer + loop
//! state + logs ([`save_checkpoint`], [`resume`]).
//!
//! Nothing here draws from a stateful RNG: the data order of epoch `e` is a pure function
//! of (seed, stream name, e) ([`epoch_order`]), and sampling seeds come from `derive_seed`.
//! So the "RNG state" a checkpoint must hold is just the loop counters, and a resumed run
//! replays bit for bit what an uninterrupted run would have done.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use emflow_model::seed::{self, Purpose};
use emflow_model::AdamW;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{de::DeserializeOwned, Serialize};

use super::checkpoint;
use super::metrics_log::JsonlLog;
use super::policy::Policy;

const WEIGHTS: &str = "weights";
const OPTIMIZER: &str = "optimizer.safetensors";
const LOGS: &str = "logs";

/// The order of `n` items in epoch `epoch` of stream `stream`.
///
/// Keyed by [`Purpose::EpochOrder`] and shuffled with `rand`'s `SliceRandom`: both older than
/// the seeding rule and the dataset's pinned Fisher-Yates, kept so that `sft` and `rl` keep
/// their data order (see `emflow_model::seed`).
pub fn epoch_order(n: usize, seed: u64, stream: &str, epoch: u64) -> Vec<usize> {
    let mut rng: ChaCha8Rng = seed::stream(Purpose::EpochOrder {
        seed,
        stream,
        epoch,
    });
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

/// An endless, reshuffled-each-epoch walk over a dataset; its position is one number.
#[derive(Clone, Debug)]
pub struct Cursor {
    n: usize,
    seed: u64,
    stream: &'static str,
    /// Items consumed so far (the checkpointed position).
    pub consumed: u64,
    order: Vec<usize>,
    order_epoch: u64,
}

impl Cursor {
    pub fn new(n: usize, seed: u64, stream: &'static str, consumed: u64) -> Self {
        Cursor {
            n,
            seed,
            stream,
            consumed,
            order: Vec::new(),
            order_epoch: u64::MAX,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.consumed / self.n.max(1) as u64
    }

    /// The next `k` item indices (with the epoch each was drawn in).
    pub fn take(&mut self, k: usize) -> Vec<(usize, u64)> {
        let mut out = Vec::with_capacity(k);
        for _ in 0..k {
            let epoch = self.epoch();
            if epoch != self.order_epoch {
                self.order = epoch_order(self.n, self.seed, self.stream, epoch);
                self.order_epoch = epoch;
            }
            let pos = (self.consumed % self.n as u64) as usize;
            out.push((self.order[pos], epoch));
            self.consumed += 1;
        }
        out
    }
}

/// A restored checkpoint: the loop state and where the logs' copies lie.
pub struct Resumed<S> {
    pub state: S,
    pub dir: PathBuf,
}

impl<S> Resumed<S> {
    /// The checkpointed copy of log `name`, to continue from.
    pub fn log(&self, name: &str) -> Option<PathBuf> {
        let p = self.dir.join(LOGS).join(name);
        p.is_file().then_some(p)
    }
}

/// Restores weights, optimizer and state from the newest checkpoint under `root`, if any.
pub fn resume<S: DeserializeOwned>(
    root: &Path,
    policy: &mut Policy,
    opt: &mut AdamW,
) -> Result<Option<Resumed<S>>> {
    let Some(dir) = checkpoint::latest(root) else {
        return Ok(None);
    };
    let state = checkpoint::load_state(&dir)?;
    policy
        .restore(&dir.join(WEIGHTS))
        .with_context(|| format!("restoring weights from {}", dir.display()))?;
    opt.load(&dir.join(OPTIMIZER))
        .with_context(|| format!("restoring optimizer from {}", dir.display()))?;
    Ok(Some(Resumed { state, dir }))
}

/// Restores the newest checkpoint under `root`, if any, into `policy` and `opt`, and opens
/// each `(name, path)` log: continued from the checkpoint's copy, or empty. Returns the
/// checkpointed loop state (`None` for a fresh start) and the logs in order.
pub fn resume_with_logs<S: DeserializeOwned>(
    root: &Path,
    policy: &mut Policy,
    opt: &mut AdamW,
    logs: &[(&str, PathBuf)],
) -> Result<(Option<S>, Vec<JsonlLog>)> {
    let resumed = resume::<S>(root, policy, opt)?;
    let logs = logs
        .iter()
        .map(|(name, path)| {
            let from = resumed.as_ref().and_then(|r| r.log(name));
            JsonlLog::open(path, from.as_deref())
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((resumed.map(|r| r.state), logs))
}

/// Writes a checkpoint of everything a resumed run needs: weights, optimizer, loop state
/// and a copy of each log.
pub fn save_checkpoint<S: Serialize>(
    root: &Path,
    policy: &Policy,
    opt: &AdamW,
    state: &S,
    logs: &[&JsonlLog],
) -> Result<()> {
    checkpoint::save(root, |dir| {
        policy.save(&dir.join(WEIGHTS))?;
        opt.save(&dir.join(OPTIMIZER))?;
        std::fs::create_dir_all(dir.join(LOGS))?;
        for log in logs {
            let name = log
                .path()
                .file_name()
                .context("log path has no file name")?;
            std::fs::copy(log.path(), dir.join(LOGS).join(name))
                .with_context(|| format!("copying {} into the checkpoint", log.path().display()))?;
        }
        checkpoint::save_state(dir, state)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_resumes_mid_epoch_identically() {
        let mut a = Cursor::new(5, 7, "data", 0);
        let all: Vec<_> = a.take(12);
        let mut b = Cursor::new(5, 7, "data", 7);
        assert_eq!(b.take(5), all[7..12].to_vec());
        // Each epoch is a permutation, and epochs differ.
        let mut e0: Vec<usize> = all[0..5].iter().map(|x| x.0).collect();
        e0.sort();
        assert_eq!(e0, vec![0, 1, 2, 3, 4]);
        assert_eq!(all[5].1, 1);
        assert_ne!(epoch_order(50, 7, "data", 0), epoch_order(50, 7, "data", 1));
        // Pinned (taken before the order went through `emflow_model::seed`): a change here
        // changes every `sft` and `rl` output, so it must come with their version bumps.
        assert_eq!(
            epoch_order(10, 7, "data", 2),
            [9, 8, 5, 6, 2, 0, 3, 4, 7, 1]
        );
        assert_eq!(
            epoch_order(10, 0, "prompts", 0),
            [2, 9, 7, 1, 4, 6, 5, 3, 8, 0]
        );
    }
}
