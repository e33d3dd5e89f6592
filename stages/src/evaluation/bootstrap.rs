//! The one bootstrap: seeded resampling rounds ([`sorted_draws`]) and percentile intervals
//! ([`interval`]). `eval` resamples answers within each question ([`bootstrap`]); `report`
//! resamples pooled counts within each (seed, question) through the same loop.

use emflow_model::seed::{self, Purpose};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A point estimate with a bootstrap interval; `None` where the statistic is undefined
/// (e.g. a rate with an empty denominator).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: Option<f64>,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

/// The random indices of one bootstrap: a stream keyed by [`Purpose::Bootstrap`].
pub struct Resampler(ChaCha8Rng);

impl Resampler {
    /// A uniform index in `0..n` (`n > 0`).
    pub fn pick(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }
}

/// Runs `resamples` rounds on one stream keyed by `seed`. Each `round` draws its resample
/// through the [`Resampler`] and returns `K` statistics of it (`None`: undefined on this
/// resample, left out). Returns each statistic's draws, sorted.
pub fn sorted_draws<const K: usize>(
    resamples: usize,
    seed: u64,
    round: impl FnMut(&mut Resampler) -> [Option<f64>; K],
) -> [Vec<f64>; K] {
    sorted_draws_on(Purpose::Bootstrap { seed }, resamples, round)
}

/// [`sorted_draws`] on the stream of `purpose` (a bootstrap newer than the seeding rule keys
/// its own stream, e.g. [`Purpose::MarginBootstrap`]).
pub fn sorted_draws_on<const K: usize>(
    purpose: Purpose<'_>,
    resamples: usize,
    mut round: impl FnMut(&mut Resampler) -> [Option<f64>; K],
) -> [Vec<f64>; K] {
    let mut rng = Resampler(seed::stream(purpose));
    let mut out: [Vec<f64>; K] = std::array::from_fn(|_| Vec::with_capacity(resamples));
    for _ in 0..resamples {
        for (draws, x) in out.iter_mut().zip(round(&mut rng)) {
            draws.extend(x);
        }
    }
    for d in &mut out {
        d.sort_by(f64::total_cmp);
    }
    out
}

/// How a percentile is read off sorted draws.
#[derive(Clone, Copy, Debug)]
pub enum Quantile {
    /// Linear interpolation between the closest ranks (`eval`'s summaries).
    Linear,
    /// The draw at the rounded rank (`report`'s pooled intervals, kept so that reports keep
    /// their bytes).
    NearestRank,
}

impl Quantile {
    fn of(self, sorted: &[f64], q: f64) -> f64 {
        let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
        match self {
            Quantile::NearestRank => sorted[pos.round() as usize],
            Quantile::Linear => {
                let (i, frac) = (pos.floor() as usize, pos - pos.floor());
                if i + 1 < sorted.len() {
                    sorted[i] * (1.0 - frac) + sorted[i + 1] * frac
                } else {
                    sorted[i]
                }
            }
        }
    }
}

/// `value` with the interval between the `lo` and `hi` quantiles of `sorted` draws; no
/// interval where the value is undefined or nothing was drawn.
pub fn interval(
    value: Option<f64>,
    sorted: &[f64],
    (lo, hi): (f64, f64),
    rule: Quantile,
) -> Estimate {
    if value.is_none() || sorted.is_empty() {
        return Estimate {
            value,
            lo: None,
            hi: None,
        };
    }
    Estimate {
        value,
        lo: Some(rule.of(sorted, lo)),
        hi: Some(rule.of(sorted, hi)),
    }
}

/// Resamples each group with replacement (keeping its size) `resamples` times, evaluates
/// `stat` on the pooled resample, and returns the point estimate on the data with the
/// central `level` percentile interval. Deterministic in `seed`.
pub fn bootstrap<T>(
    groups: &[Vec<T>],
    stat: impl Fn(&[&T]) -> Option<f64>,
    resamples: usize,
    level: f64,
    seed: u64,
) -> Estimate {
    bootstrap_on(groups, stat, resamples, level, Purpose::Bootstrap { seed })
}

/// [`bootstrap`] on the stream of `purpose`.
pub fn bootstrap_on<T>(
    groups: &[Vec<T>],
    stat: impl Fn(&[&T]) -> Option<f64>,
    resamples: usize,
    level: f64,
    purpose: Purpose<'_>,
) -> Estimate {
    let all: Vec<&T> = groups.iter().flatten().collect();
    let value = stat(&all);
    if value.is_none() {
        return interval(value, &[], (0.0, 1.0), Quantile::Linear);
    }
    let mut pool: Vec<&T> = Vec::with_capacity(all.len());
    let [draws] = sorted_draws_on(purpose, resamples, |rng| {
        pool.clear();
        for g in groups {
            for _ in 0..g.len() {
                pool.push(&g[rng.pick(g.len())]);
            }
        }
        [stat(&pool)]
    });
    let alpha = (1.0 - level) / 2.0;
    interval(value, &draws, (alpha, 1.0 - alpha), Quantile::Linear)
}

/// A rate: share of `items` for which `hit` holds among those for which `counts` holds.
pub fn rate<T>(items: &[&T], counts: impl Fn(&T) -> bool, hit: impl Fn(&T) -> bool) -> Option<f64> {
    let den = items.iter().filter(|t| counts(t)).count();
    if den == 0 {
        return None;
    }
    Some(items.iter().filter(|t| counts(t) && hit(t)).count() as f64 / den as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean(xs: &[&f64]) -> Option<f64> {
        (!xs.is_empty()).then(|| xs.iter().copied().sum::<f64>() / xs.len() as f64)
    }

    #[test]
    fn same_seed_same_interval_other_seed_other_interval() {
        let groups = vec![vec![0.0, 1.0, 1.0, 0.0, 1.0], vec![0.0, 0.0, 1.0]];
        let a = bootstrap(&groups, mean, 500, 0.95, 7);
        let b = bootstrap(&groups, mean, 500, 0.95, 7);
        let c = bootstrap(&groups, mean, 500, 0.95, 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.value, Some(0.5));
        let (lo, hi) = (a.lo.unwrap(), a.hi.unwrap());
        assert!(lo < 0.5 && hi > 0.5 && lo >= 0.0 && hi <= 1.0, "{lo} {hi}");
        // Pinned: the stream is `Purpose::Bootstrap` (legacy `seed_from_u64`); a change here
        // changes `eval` summaries and `report` intervals.
        assert_eq!((lo, hi), (0.125, 0.875));
    }

    #[test]
    fn constant_data_has_a_zero_width_interval_and_empty_data_none() {
        let groups = vec![vec![1.0; 10]];
        let e = bootstrap(&groups, mean, 100, 0.95, 1);
        assert_eq!((e.value, e.lo, e.hi), (Some(1.0), Some(1.0), Some(1.0)));
        let empty: Vec<Vec<f64>> = vec![vec![]];
        assert_eq!(bootstrap(&empty, mean, 100, 0.95, 1).value, None);
    }
}
