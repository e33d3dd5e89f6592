//! When to take an interleaved safety step.
//!
//! Safety steps are SFT steps on a safety dataset slotted between the main steps (SFT or
//! RL). The schedule is a pure function of the number of main steps taken, so a resumed run
//! interleaves exactly as an uninterrupted one, and the log can be checked against the
//! configured ratio: after `m` main steps, `every: k` has inserted `floor(m / k)` safety
//! steps, and `share: s` has inserted `floor(m * s / (1 - s))`, i.e. `s` of all steps.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// How often safety steps are inserted.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Cadence {
    /// One safety step after every `k` main steps.
    Every(u64),
    /// Safety steps make up this share of all steps, in (0, 1).
    Share(f64),
}

impl Cadence {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Cadence::Every(k) => ensure!(k >= 1, "`every` must be at least 1, got {k}"),
            Cadence::Share(s) => ensure!(
                s > 0.0 && s < 1.0,
                "`share` must lie strictly between 0 and 1, got {s}"
            ),
        }
        Ok(())
    }

    /// Safety steps due in total once `main_steps` main steps are done.
    pub fn due_after(&self, main_steps: u64) -> u64 {
        match *self {
            Cadence::Every(k) => main_steps / k.max(1),
            // The small epsilon keeps e.g. 0.05 * 19 / 0.95 = 0.99999.. from rounding down.
            Cadence::Share(s) => ((main_steps as f64) * s / (1.0 - s) + 1e-9).floor() as u64,
        }
    }

    /// Safety steps to take right after main step number `main_steps` (1-based).
    pub fn steps_after(&self, main_steps: u64) -> u64 {
        self.due_after(main_steps) - self.due_after(main_steps.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_k_inserts_one_after_each_kth_step() {
        let c = Cadence::Every(3);
        let after: Vec<u64> = (1..=9).map(|m| c.steps_after(m)).collect();
        assert_eq!(after, vec![0, 0, 1, 0, 0, 1, 0, 0, 1]);
    }

    #[test]
    fn share_gives_that_share_of_all_steps() {
        let c = Cadence::Share(0.05);
        let safety: u64 = (1..=190).map(|m| c.steps_after(m)).sum();
        assert_eq!(safety, 10);
        assert_eq!(c.steps_after(19), 1);
        assert_eq!(c.steps_after(18), 0);
        let half = Cadence::Share(0.5);
        assert!((1..=10).all(|m| half.steps_after(m) == 1));
        assert!(Cadence::Share(1.0).validate().is_err());
        assert!(Cadence::Every(0).validate().is_err());
    }
}
