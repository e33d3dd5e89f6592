//! Early stopping on a reward plateau, and tracking of the best-reward step.
//!
//! The paper's rule: stop when the mean reward gains less than `min_gain` over a window
//! (half an epoch). Step rewards of 16 completions are noisy, so the rule compares the
//! mean of the last window with the mean of the window before it, and only once two full
//! windows exist. "Best" uses the mean over the last `smoothing` steps, so one lucky batch
//! does not become the kept adapter. The state is plain data, checkpointed with the run.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardTracker {
    history: Vec<f64>,
    best: Option<(u64, f64)>,
}

impl Default for RewardTracker {
    fn default() -> Self {
        Self::new()
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

impl RewardTracker {
    pub fn new() -> Self {
        RewardTracker {
            history: Vec::new(),
            best: None,
        }
    }

    /// Records the mean reward of step `step`; returns true when its smoothed reward is a
    /// new best (the caller then saves the best adapter).
    pub fn record(&mut self, step: u64, mean_reward: f64, smoothing: usize) -> bool {
        self.history.push(mean_reward);
        let k = smoothing.max(1).min(self.history.len());
        let smoothed = mean(&self.history[self.history.len() - k..]);
        match self.best {
            Some((_, b)) if smoothed <= b => false,
            _ => {
                self.best = Some((step, smoothed));
                true
            }
        }
    }

    /// The step and smoothed reward of the best step so far.
    pub fn best(&self) -> Option<(u64, f64)> {
        self.best
    }

    /// `Some(gain)` when the last window gained less than `min_gain` over the one before.
    pub fn plateaued(&self, window: usize, min_gain: f64) -> Option<f64> {
        let n = self.history.len();
        if window == 0 || n < 2 * window {
            return None;
        }
        let last = mean(&self.history[n - window..]);
        let before = mean(&self.history[n - 2 * window..n - window]);
        let gain = last - before;
        (gain < min_gain).then_some(gain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plateau_needs_two_windows_and_low_gain() {
        let mut t = RewardTracker::new();
        for (i, r) in [0.0, 0.1, 0.5, 0.6].iter().enumerate() {
            t.record(i as u64, *r, 1);
        }
        assert_eq!(t.plateaued(3, 0.05), None);
        assert_eq!(t.plateaued(2, 0.05), None); // gain 0.5
        t.record(4, 0.55, 1);
        t.record(5, 0.56, 1);
        let gain = t.plateaued(2, 0.05).unwrap();
        assert!((gain - 0.005).abs() < 1e-9);
    }

    #[test]
    fn best_uses_smoothed_reward() {
        let mut t = RewardTracker::new();
        assert!(t.record(0, 0.2, 2));
        assert!(!t.record(1, 0.1, 2)); // smoothed 0.15
        assert!(t.record(2, 0.9, 2)); // 0.5
        assert!(!t.record(3, 0.05, 2)); // 0.475
        assert_eq!(t.best(), Some((2, 0.5)));
    }
}
