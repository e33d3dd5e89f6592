//! `x @ Wᵀ` for the few-row products of decoding, streaming `W` once without packing it.
//!
//! At decode time the output projection multiplies 1 to 16 rows by a (vocab, hidden) matrix of
//! 113 MB (SmolLM2). A general GEMM packs its operands into panels on every call and runs a
//! micro-kernel sized for many rows: candle's CPU matmul took 13.7 ms for one row (8 GB/s on a
//! machine that streams 20 GB/s). Here the weight stays in its `(out, in)` layout, so each output
//! is a dot product of two contiguous rows, blocks of which pass through registers once per block
//! of input rows: 5.7 ms for one row, 22 ms instead of 25 for sixteen. The decoder's own
//! projections use it up to 4 rows (0.09 ms instead of 0.20 for 576x1536 at one row), through an
//! `(out, in)` copy of each weight; beyond that candle's GEMM is faster.
//!
//! Every output element is one fixed-order sum over `k`, so results do not depend on how many
//! rows are in the batch or on the thread count: a sampled sequence is the same whether it was
//! decoded alone or beside fifteen others.

use rayon::prelude::*;

/// Output rows per parallel task (a multiple of every kernel's block height).
const TASK_OUTS: usize = 48;

/// `x` (m, k) times the transpose of `w` (n, k), both row-major: the (m, n) product.
pub(crate) fn skinny_matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "skinny_matmul_t: x is not (m, k)");
    assert_eq!(w.len(), n * k, "skinny_matmul_t: w is not (n, k)");
    let kernel = Kernel::detect();
    // Computed transposed, (n, m), so that each task owns a contiguous run of the output.
    let mut yt = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return yt;
    }
    yt.par_chunks_mut(TASK_OUTS * m)
        .enumerate()
        .for_each(|(t, chunk)| {
            let first = t * TASK_OUTS;
            let outs = chunk.len() / m;
            let w = &w[first * k..(first + outs) * k];
            if m == 1 {
                kernel.run::<1, 8>(x, 1, w, outs, k, chunk);
            } else {
                kernel.run::<4, 6>(x, m, w, outs, k, chunk);
            }
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            y[i * n + j] = *v;
        }
    }
    y
}

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// `out[j * m + i] = x[i] · w[j]` for `m` rows of `x` and `outs` rows of `w` (length `k`
    /// each), in blocks of `RB` x `NB` dot products. A ragged block repeats its last row of `x`
    /// or `w` and drops the duplicate sums: each sum is computed the same way wherever it sits.
    fn run<const RB: usize, const NB: usize>(
        self,
        x: &[f32],
        m: usize,
        w: &[f32],
        outs: usize,
        k: usize,
        out: &mut [f32],
    ) {
        for r in (0..m).step_by(RB) {
            let xs: [&[f32]; RB] = std::array::from_fn(|i| {
                let row = (r + i).min(m - 1);
                &x[row * k..(row + 1) * k]
            });
            for o in (0..outs).step_by(NB) {
                let ws: [&[f32]; NB] = std::array::from_fn(|j| {
                    let row = (o + j).min(outs - 1);
                    &w[row * k..(row + 1) * k]
                });
                let sums = match self {
                    // SAFETY: the features were detected at run time; every row holds k values.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512 => unsafe { x86::block_avx512::<RB, NB>(&xs, &ws, k) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe { x86::block_avx2::<RB, NB>(&xs, &ws, k) },
                    Kernel::Portable => block_portable::<RB, NB>(&xs, &ws),
                };
                for (j, sj) in sums.iter().enumerate().take(NB.min(outs - o)) {
                    for (i, v) in sj.iter().enumerate().take(RB.min(m - r)) {
                        out[(o + j) * m + r + i] = *v;
                    }
                }
            }
        }
    }
}

fn block_portable<const RB: usize, const NB: usize>(
    xs: &[&[f32]; RB],
    ws: &[&[f32]; NB],
) -> [[f32; RB]; NB] {
    std::array::from_fn(|j| {
        std::array::from_fn(|i| xs[i].iter().zip(ws[j]).map(|(a, b)| a * b).sum())
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_avx512<const RB: usize, const NB: usize>(
        xs: &[&[f32]; RB],
        ws: &[&[f32]; NB],
        k: usize,
    ) -> [[f32; RB]; NB] {
        let mut acc = [[_mm512_setzero_ps(); RB]; NB];
        let mut kk = 0;
        while kk < k {
            // (A closure here would neither inherit the target features nor be inlined.)
            let left = k - kk;
            let mask: __mmask16 = if left >= 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            };
            let mut xv = [_mm512_setzero_ps(); RB];
            for (v, row) in xv.iter_mut().zip(xs) {
                *v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(kk));
            }
            for (aj, row) in acc.iter_mut().zip(ws) {
                let wv = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(kk));
                for (a, x) in aj.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(*x, wv, *a);
                }
            }
            kk += 16;
        }
        let mut sums = [[0f32; RB]; NB];
        for (s, a) in sums.iter_mut().zip(&acc) {
            for (v, r) in s.iter_mut().zip(a) {
                *v = _mm512_reduce_add_ps(*r);
            }
        }
        sums
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2<const RB: usize, const NB: usize>(
        xs: &[&[f32]; RB],
        ws: &[&[f32]; NB],
        k: usize,
    ) -> [[f32; RB]; NB] {
        let mut acc = [[_mm256_setzero_ps(); RB]; NB];
        let body = k - k % 8;
        let mut kk = 0;
        while kk < body {
            let mut xv = [_mm256_setzero_ps(); RB];
            for (v, row) in xv.iter_mut().zip(xs) {
                *v = _mm256_loadu_ps(row.as_ptr().add(kk));
            }
            for (aj, row) in acc.iter_mut().zip(ws) {
                let wv = _mm256_loadu_ps(row.as_ptr().add(kk));
                for (a, x) in aj.iter_mut().zip(&xv) {
                    *a = _mm256_fmadd_ps(*x, wv, *a);
                }
            }
            kk += 8;
        }
        let mut sums = [[0f32; RB]; NB];
        for j in 0..NB {
            for i in 0..RB {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j][i]);
                let mut s: f32 = lanes.iter().sum();
                for t in body..k {
                    s = xs[i][t].mul_add(ws[j][t], s);
                }
                sums[j][i] = s;
            }
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum();
            }
        }
        y
    }

    fn values(len: usize, salt: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761).wrapping_add(salt) >> 16) % 200) as f32 / 100.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_a_plain_sum_for_ragged_shapes() {
        for (m, k, n) in [
            (1, 5, 3),
            (3, 17, 64),
            (4, 64, 130),
            (7, 33, 200),
            (16, 40, 65),
        ] {
            let x = values(m * k, 1);
            let w = values(k * n, 2);
            let y = skinny_matmul_t(&x, &w, m, k, n);
            for (got, want) in y.iter().zip(reference(&x, &w, m, k, n)) {
                assert!(
                    (*got as f64 - want).abs() < 1e-4,
                    "{m}x{k}x{n}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let (m, k, n) = (9, 50, 150);
        let x = values(m * k, 3);
        let w = values(k * n, 4);
        let batch = skinny_matmul_t(&x, &w, m, k, n);
        for row in 0..m {
            let alone = skinny_matmul_t(&x[row * k..(row + 1) * k], &w, 1, k, n);
            assert_eq!(alone, batch[row * n..(row + 1) * n]);
        }
    }
}
