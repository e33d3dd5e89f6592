//! Early stopping on a reward plateau, and tracking of the best-reward step.
//!
//! Two rules, named by [`EarlyStopRule`]:
//! - `rolling` (emflow's default): stop when the mean reward gains less than `min_gain` over
//!   a window (half an epoch). Step rewards of 16 completions are noisy, so the rule compares
//!   the mean of the last window with the mean of the window before it, checked after every
//!   step once two full windows exist ([`RewardTracker::plateaued`]).
//! - `ema_rl`: the paper's code (EMA_RL `open_models/grpo.py`, `BestRewardCallback`) checks
//!   only at fixed points, epochs `e + k / (checks_per_epoch + 1)` (0.5 and 1.5 for two
//!   epochs), and only on a logging step (every `log_every` steps, where the trainer logs).
//!   At each point it takes the mean reward since the previous point and stops when that
//!   gained less than `min_gain` over the previous interval's mean
//!   ([`RewardTracker::ema_rl_check`]). The first point only records its mean, so with two
//!   epochs the only test is at epoch 1.5 (epochs 0.5-1.5 against 0-0.5).
//!
//! "Best" uses the mean over the last `smoothing` steps, so one lucky batch does not become
//! the kept adapter. The state is plain data, checkpointed with the run.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which early-stopping rule an `rl` stage applies (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EarlyStopRule {
    /// A rolling window, checked after every step from the end of the second window.
    #[default]
    Rolling,
    /// EMA_RL's rule: checks at epochs 0.5, 1.5, ... on logging steps only.
    EmaRl,
}

/// When the `ema_rl` rule looks: the run's length in epochs and steps, and the trainer's
/// logging cadence (EMA_RL: `evaluate_epoch: 1`, `logging_steps: 5`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmaRlSchedule {
    /// RL steps per pass over the prompts (prompts / prompts_per_step, not rounded: the
    /// trainer's fractional epoch counter).
    pub steps_per_epoch: f64,
    /// Passes over the prompts the run was set up for.
    pub epochs: u64,
    /// Check points per epoch (EMA_RL's `evaluate_epoch`).
    pub checks_per_epoch: usize,
    /// Steps between logging steps (EMA_RL's `logging_steps`); checks happen only there.
    pub log_every: u64,
}

impl EmaRlSchedule {
    /// The check points in epochs, in order: `e + k / (checks_per_epoch + 1)`.
    fn points(&self) -> Vec<f64> {
        let denom = self.checks_per_epoch as f64 + 1.0;
        (0..self.epochs)
            .flat_map(|e| (1..=self.checks_per_epoch).map(move |k| e as f64 + k as f64 / denom))
            .collect()
    }
}

/// Where the `ema_rl` rule stands: the next check point, where the current interval
/// started, and the previous interval's mean.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct EmaRlState {
    next_point: usize,
    interval_start: usize,
    last_mean: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardTracker {
    history: Vec<f64>,
    best: Option<(u64, f64)>,
    // Added with the `ema_rl` rule: checkpoints written before it read as a fresh state.
    #[serde(default)]
    ema_rl: EmaRlState,
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
            ema_rl: EmaRlState::default(),
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

    /// The `ema_rl` rule after the step just recorded: `Some((gain, epoch))` when a check
    /// point passed on this step found the interval's mean reward gained less than
    /// `min_gain` over the previous interval's. Call once per recorded step.
    pub fn ema_rl_check(&mut self, s: &EmaRlSchedule, min_gain: f64) -> Option<(f64, f64)> {
        let steps = self.history.len() as u64;
        if s.log_every == 0 || !steps.is_multiple_of(s.log_every) {
            return None;
        }
        let epoch = steps as f64 / s.steps_per_epoch;
        let points = s.points();
        let st = &mut self.ema_rl;
        // Several points may pass on one logging step; the first takes the interval's
        // rewards, the others find it empty and only advance (as the callback's loop does).
        while st.next_point < points.len() && epoch >= points[st.next_point] {
            st.next_point += 1;
            let interval = &self.history[st.interval_start..];
            if interval.is_empty() {
                continue;
            }
            let m = mean(interval);
            st.interval_start = self.history.len();
            let previous = st.last_mean.replace(m);
            if let Some(gain) = previous.map(|p| m - p).filter(|g| *g < min_gain) {
                return Some((gain, epoch));
            }
        }
        None
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

    /// The paper's run: 750 prompts, 4 per step, 2 epochs = 375 steps; the rolling window is
    /// half an epoch rounded up (94 steps), EMA_RL logs every 5 steps and checks at epochs
    /// 0.5 and 1.5. Returns the steps run before each rule stops (375: it never does).
    fn steps_until_stop(trace: &[f64], rule: EarlyStopRule) -> u64 {
        let schedule = EmaRlSchedule {
            steps_per_epoch: 750.0 / 4.0,
            epochs: 2,
            checks_per_epoch: 1,
            log_every: 5,
        };
        let mut t = RewardTracker::new();
        for (i, r) in trace.iter().enumerate() {
            t.record(i as u64, *r, 5);
            let stop = match rule {
                EarlyStopRule::Rolling => t.plateaued(94, 0.05).is_some(),
                EarlyStopRule::EmaRl => t.ema_rl_check(&schedule, 0.05).is_some(),
            };
            if stop {
                return i as u64 + 1;
            }
        }
        trace.len() as u64
    }

    /// A fast-saturating reward curve, 0.75 (1 - exp(-t / 32)) at step t = 1..375: the
    /// rolling rule stops after step 237 (the last window gained 0.0487; after step 236 it
    /// had gained 0.0503), while EMA_RL's single test, at step 285 (epoch 1.52, the first
    /// logging step past 1.5), compares the mean of steps 96-285 (0.744) with that of steps
    /// 1-95 (0.514) and runs all 375 steps.
    #[test]
    fn saturating_trace_rolling_stops_at_237_ema_rl_runs_all_375() {
        let trace: Vec<f64> = (1..=375)
            .map(|t| 0.75 * (1.0 - (-(t as f64) / 32.0).exp()))
            .collect();
        assert_eq!(steps_until_stop(&trace, EarlyStopRule::Rolling), 237);
        assert_eq!(steps_until_stop(&trace, EarlyStopRule::EmaRl), 375);
        let first = mean(&trace[..95]);
        let second = mean(&trace[95..285]);
        assert!((first - 0.514).abs() < 5e-4, "{first}");
        assert!((second - 0.744).abs() < 5e-4, "{second}");
    }

    /// On a flat curve EMA_RL stops at its only test (step 285), never at epoch 0.5, and
    /// never between logging steps.
    #[test]
    fn ema_rl_tests_only_at_epoch_one_and_a_half_on_a_logging_step() {
        let flat = vec![0.3; 375];
        assert_eq!(steps_until_stop(&flat, EarlyStopRule::EmaRl), 285);
        assert_eq!(steps_until_stop(&flat, EarlyStopRule::Rolling), 188);
        // Three check points per epoch: 0.25, 0.5, 0.75 -> steps 50, 95, 145: stops at 95.
        let mut t = RewardTracker::new();
        let s = EmaRlSchedule {
            steps_per_epoch: 187.5,
            epochs: 2,
            checks_per_epoch: 3,
            log_every: 5,
        };
        let stopped = (0..375u64).find(|&i| {
            t.record(i, 0.3, 1);
            t.ema_rl_check(&s, 0.05).is_some()
        });
        assert_eq!(stopped, Some(94));
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
