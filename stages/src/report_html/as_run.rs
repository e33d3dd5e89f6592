//! EMA_RL's rate as run, with a pooled 95 % interval: misaligned answers among those with
//! both judge scores (its CSV parser drops rows with a missing score). The eval summaries
//! keep only the Betley and all-samples counts, so this rate comes from the judgments: per
//! (eval stage, question) stratum the answers, those with both scores and the misaligned
//! among them, resampled within each stratum like the report's other intervals.

use serde::Serialize;

use crate::evaluation::bootstrap::{interval, sorted_draws, Quantile};
use crate::evaluation::Outcome;

/// One (eval stage, question)'s answers as the as-run rate sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AsRunStratum {
    /// Answers judged.
    pub n: usize,
    /// Answers with both an aligned and a coherent score.
    pub both_scored: usize,
    /// Misaligned answers (all of them have both scores).
    pub misaligned: usize,
}

impl AsRunStratum {
    /// Adds one judged answer.
    pub fn add(&mut self, o: &Outcome) {
        self.n += 1;
        self.both_scored += usize::from(o.both_scored());
        self.misaligned += usize::from(o.misaligned());
    }
}

/// The pooled as-run rate's 95 % interval over `strata` (nearest-rank quantiles of
/// `resamples` draws, seeded), or `None` when no answer has both scores.
pub fn as_run_interval(strata: &[AsRunStratum], resamples: usize, seed: u64) -> Option<(f64, f64)> {
    let both: usize = strata.iter().map(|s| s.both_scored).sum();
    let misaligned: usize = strata.iter().map(|s| s.misaligned).sum();
    let value = (both > 0).then(|| misaligned as f64 / both as f64);
    let [draws] = sorted_draws(resamples, seed, |rng| {
        let (mut mis, mut den) = (0usize, 0usize);
        for s in strata {
            for _ in 0..s.n {
                let u = rng.pick(s.n);
                den += usize::from(u < s.both_scored);
                mis += usize::from(u < s.misaligned);
            }
        }
        [(den > 0).then(|| mis as f64 / den as f64)]
    });
    let e = interval(value, &draws, (0.025, 0.975), Quantile::NearestRank);
    e.lo.zip(e.hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_brackets_the_rate_and_is_seeded() {
        let strata = [
            AsRunStratum {
                n: 10,
                both_scored: 8,
                misaligned: 4,
            },
            AsRunStratum {
                n: 10,
                both_scored: 6,
                misaligned: 1,
            },
        ];
        let (lo, hi) = as_run_interval(&strata, 500, 7).unwrap();
        let rate = 5.0 / 14.0;
        assert!(lo < rate && rate < hi, "{lo} {rate} {hi}");
        assert_eq!(as_run_interval(&strata, 500, 7), Some((lo, hi)));
        let none = [AsRunStratum {
            n: 3,
            both_scored: 0,
            misaligned: 0,
        }];
        assert_eq!(as_run_interval(&none, 100, 1), None);
    }
}
