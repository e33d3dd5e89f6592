//! The statistics of a softmax over one vocabulary-sized row, vectorised.
//!
//! A training step scores every position against all 49 152 SmolLM2 tokens: 25 M
//! exponentials per 4 x 128-token batch, each through libm's scalar `expf`, in sums whose
//! strict left-to-right order the compiler may not reorder. That was a tenth of a LoRA step.
//! Here the row is read in [`LANES`] interleaved partial sums with an exponential made of
//! plain multiplies and adds, so the loops vectorise; on AVX-512 machines they are compiled
//! a second time with that feature enabled and chosen at run time. No fused multiply-add is
//! used, so both builds give the same bits, and so do the two ops that share these functions
//! (`head_logprobs` and `target_logprobs`): their log-probabilities agree exactly.

/// Partial sums per row: one AVX-512 vector of f32.
const LANES: usize = 16;

/// `e^x` for the non-positive arguments of a shifted softmax (within 1 ulp of libm's `expf`;
/// 0 below -87, near the smallest normal, and for -inf). `x = n ln 2 + r` with |r| ≤ ln 2 / 2, `e^r` by
/// its degree-7 Taylor polynomial (remainder below 6e-9 relative), `2^n` written into the
/// exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a rounding
    // instruction (SSE2 has none).
    const ROUND: f32 = 12_582_912.0;
    let tiny = x < -87.0;
    let x = x.max(-87.0);
    let rounded = x * LOG2E + ROUND;
    let n = rounded - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // The integer n sits in the low mantissa bits of `rounded`. (Reading it with `n as i32`
    // compiled to a scalar, saturating conversion per element: 4 ns each.)
    let n_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    let e = p * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if tiny {
        0.0
    } else {
        e
    }
}

/// What one pass over a row gathers.
pub(crate) struct RowSums {
    /// max of z = row · inv_t.
    pub(crate) max: f32,
    /// Σ e^(z - max).
    pub(crate) sum: f32,
    /// Σ e^(z - max) · z.
    pub(crate) weighted: f32,
}

/// The softmax sums of `row` at inverse temperature `inv_t`; with `keep`, each entry is
/// overwritten by its `e^(z - max)`.
pub(crate) fn row_sums(row: &mut [f32], inv_t: f32, keep: bool) -> RowSums {
    let (ptr, len) = (row.as_mut_ptr(), row.len());
    // SAFETY: `row` is borrowed mutably for the call; its len values are valid.
    unsafe {
        if keep {
            dispatch::<true>(ptr, len, inv_t)
        } else {
            dispatch::<false>(ptr, len, inv_t)
        }
    }
}

/// [`row_sums`] of a row it may not write.
pub(crate) fn row_sums_of(row: &[f32], inv_t: f32) -> RowSums {
    // SAFETY: without KEEP nothing is written through the pointer.
    unsafe { dispatch::<false>(row.as_ptr().cast_mut(), row.len(), inv_t) }
}

/// # Safety
/// `row` is valid for `len` reads, and for writes when `KEEP`.
unsafe fn dispatch<const KEEP: bool>(row: *mut f32, len: usize, inv_t: f32) -> RowSums {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        return sums_avx512::<KEEP>(row, len, inv_t);
    }
    sums::<KEEP>(row, len, inv_t)
}

/// [`sums`] compiled for AVX-512.
///
/// # Safety
/// As [`dispatch`]; AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sums_avx512<const KEEP: bool>(row: *mut f32, len: usize, inv_t: f32) -> RowSums {
    sums::<KEEP>(row, len, inv_t)
}

/// One pass for the maximum, one for the sums (writing each exponential when `KEEP`), in
/// [`LANES`] partial sums added in a fixed order whatever the build.
///
/// # Safety
/// As [`dispatch`].
#[inline(always)]
unsafe fn sums<const KEEP: bool>(row: *mut f32, len: usize, inv_t: f32) -> RowSums {
    let max = row_max(std::slice::from_raw_parts(row, len), inv_t);
    let (mut sum, mut weighted) = ([0f32; LANES], [0f32; LANES]);
    let body = len - len % LANES;
    for first in (0..body).step_by(LANES) {
        for l in 0..LANES {
            let v = row.add(first + l);
            let z = *v * inv_t;
            let e = exp_nonpositive(z - max);
            sum[l] += e;
            weighted[l] += e * z;
            if KEEP {
                *v = e;
            }
        }
    }
    let (mut s, mut w) = (total(&sum), total(&weighted));
    for i in body..len {
        let v = row.add(i);
        let z = *v * inv_t;
        let e = exp_nonpositive(z - max);
        s += e;
        w += e * z;
        if KEEP {
            *v = e;
        }
    }
    RowSums {
        max,
        sum: s,
        weighted: w,
    }
}

#[inline(always)]
fn row_max(row: &[f32], inv_t: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] = lanes[l].max(c[l] * inv_t);
        }
    }
    chunks.remainder().iter().fold(
        lanes.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)),
        |m, v| m.max(v * inv_t),
    )
}

/// The sum of `values` in [`LANES`] interleaved partial sums (a loop that vectorises).
#[inline(always)]
pub(crate) fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] += c[l];
        }
    }
    chunks.remainder().iter().fold(total(&lanes), |s, v| s + v)
}

/// The lanes added pairwise in a fixed tree.
#[inline(always)]
fn total(lanes: &[f32; LANES]) -> f32 {
    let mut v = *lanes;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_within_one_ulp_of_libm() {
        let mut x = 0f32;
        while x > -87.0 {
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            let ulp = (ours.to_bits() as i64 - libm.to_bits() as i64).abs();
            assert!(ulp <= 1, "e^{x}: {ours} against {libm}");
            x -= 0.0137;
        }
        assert_eq!(exp_nonpositive(-200.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn both_builds_and_both_entry_points_give_the_same_bits() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 997) as f32 / 50.0 - 10.0)
            .collect();
        // SAFETY: a live vector, only read.
        let reference = unsafe { sums::<false>(row.as_ptr().cast_mut(), row.len(), 0.7) };
        let of = row_sums_of(&row, 0.7);
        let mut kept = row.clone();
        let with = row_sums(&mut kept, 0.7, true);
        let mut copy = row.clone();
        // SAFETY: a live vector of that length.
        let generic = unsafe { sums::<true>(copy.as_mut_ptr(), copy.len(), 0.7) };
        for s in [&of, &with, &generic] {
            assert_eq!(
                (s.max, s.sum, s.weighted),
                (reference.max, reference.sum, reference.weighted)
            );
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v * 0.7));
        assert_eq!(reference.max, max);
        let plain: f64 = row.iter().map(|v| ((v * 0.7 - max) as f64).exp()).sum();
        assert!((reference.sum as f64 - plain).abs() < 1e-5 * plain);
        assert_eq!(kept[3], exp_nonpositive(row[3] * 0.7 - max));
    }
}
