//! Seeded percentile bootstrap, stratified by group (question, or seed x question), so an
//! interval over a fixed question set resamples answers, not questions.

use rand::{Rng, SeedableRng};
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

/// Resamples each group with replacement (keeping its size) `resamples` times, evaluates
/// `stat` on the pooled resample, and returns the point estimate on the data with the
/// central `level` percentile interval. Deterministic in `seed` (ChaCha8, one stream).
pub fn bootstrap<T>(
    groups: &[Vec<T>],
    stat: impl Fn(&[&T]) -> Option<f64>,
    resamples: usize,
    level: f64,
    seed: u64,
) -> Estimate {
    let all: Vec<&T> = groups.iter().flatten().collect();
    let value = stat(&all);
    if value.is_none() || resamples == 0 {
        return Estimate {
            value,
            lo: None,
            hi: None,
        };
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draws: Vec<f64> = Vec::with_capacity(resamples);
    let mut pool: Vec<&T> = Vec::with_capacity(all.len());
    for _ in 0..resamples {
        pool.clear();
        for g in groups {
            for _ in 0..g.len() {
                pool.push(&g[rng.random_range(0..g.len())]);
            }
        }
        if let Some(x) = stat(&pool) {
            draws.push(x);
        }
    }
    if draws.is_empty() {
        return Estimate {
            value,
            lo: None,
            hi: None,
        };
    }
    draws.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    Estimate {
        value,
        lo: Some(percentile(&draws, alpha)),
        hi: Some(percentile(&draws, 1.0 - alpha)),
    }
}

/// Linear interpolation between closest ranks of sorted `xs`.
fn percentile(xs: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 1.0) * (xs.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 < xs.len() {
        xs[i] * (1.0 - frac) + xs[i + 1] * frac
    } else {
        xs[i]
    }
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
