//! `x @ W` for the 1 to 16 rows of a decode step, from a copy of `W` packed once into panels.
//!
//! A decode step multiplies a handful of rows by every weight of the model, so each weight
//! element takes part in at most sixteen multiply-adds. A general GEMM repacks `W` on every call
//! (one extra pass over all weights per step) and its micro-kernel is sized for many rows: the
//! `gemm` crate reached 55-80 GFLOPS at 16 rows against 200 on training shapes. Here `W` is
//! packed once, into panels of [`PANEL`] output columns stored k-major, so a block of rows walks
//! one panel front to back: per `k`, three vector loads of `W` and one broadcast per row feed
//! 3 x rows multiply-adds, all accumulators held in registers.
//!
//! Every output element is a single chain of fused multiply-adds over `k` in order, from zero.
//! The result for a row therefore does not depend on the other rows of the batch, the thread
//! count, or which kernel (AVX-512, AVX2, portable) ran: a sampled sequence is the same whether
//! it was decoded alone or beside fifteen others, on any x86 or other CPU.
//!
//! Training's LoRA products have the same lopsided shapes: [`matmul_few_rows`] runs the panel
//! kernel over an unpacked right-hand side for the rank-high gradients `(gs B)ᵀ x`, and
//! [`matmul_few_cols`] covers the rank-wide products `x Aᵀ` and `g B`.

use rayon::prelude::*;

use crate::ops::cpu::MatRef;

/// Output columns per panel: three AVX-512 vectors (six AVX2 vectors).
pub(crate) const PANEL: usize = 48;

/// `W` of shape (k, n), packed as `ceil(n / PANEL)` panels, each `k` rows of [`PANEL`] values
/// (the last panel zero-padded).
pub(crate) struct PanelMatrix {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PanelMatrix {
    /// Packs `w`, laid out (k, n) row-major: a projection's (in, out) weight.
    pub(crate) fn from_in_out(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "PanelMatrix: weight is not (k, n)");
        Self::pack(k, n, |p, kk, out| {
            let first = p * PANEL;
            let cols = PANEL.min(n - first);
            out[..cols].copy_from_slice(&w[kk * n + first..kk * n + first + cols]);
        })
    }

    /// Packs the transpose of `w`, laid out (n, k) row-major: an embedding used as output head.
    pub(crate) fn from_out_in(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), k * n, "PanelMatrix: weight is not (n, k)");
        Self::pack(k, n, |p, kk, out| {
            let first = p * PANEL;
            for (j, v) in out.iter_mut().enumerate().take(PANEL.min(n - first)) {
                *v = w[(first + j) * k + kk];
            }
        })
    }

    fn pack(k: usize, n: usize, fill: impl Fn(usize, usize, &mut [f32]) + Sync) -> Self {
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0f32; panels * k * PANEL];
        if k > 0 {
            data.par_chunks_mut(k * PANEL)
                .enumerate()
                .for_each(|(p, panel)| {
                    for (kk, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                        fill(p, kk, row);
                    }
                });
        }
        PanelMatrix { k, n, data }
    }

    /// Output width.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// `x` (m, k) row-major times `W`: the (m, n) product, row-major.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(Kernel::detect(), x, m)
    }

    fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        assert_eq!(x.len(), m * k, "PanelMatrix::matmul: x is not (m, k)");
        let panel_len = k * PANEL;
        let lhs = Operand {
            ptr: x.as_ptr(),
            rs: k,
            cs: 1,
        };
        // SAFETY: x holds (m, k) row-major; panel p holds k rows of PANEL values.
        unsafe {
            run_panels(kernel, lhs, (m, k, n), |p, _| Operand {
                ptr: self.data[p * panel_len..].as_ptr(),
                rs: PANEL,
                cs: 1,
            })
        }
    }
}

/// `lhs` (m, k) with any strides times `rhs` (k, n) whose rows are contiguous, read in place:
/// the panel kernel over `rhs`'s columns, for products whose few output rows are many
/// columns wide, like a LoRA factor's gradient `(gs B)ᵀ x`. (The `gemm` crate took 0.2 ms
/// for such 8 x 576 x 512 products, packing both operands for 2.4 M multiply-adds.)
pub(crate) fn matmul_few_rows(
    lhs: MatRef,
    rhs: MatRef,
    (m, k, n): (usize, usize, usize),
) -> Vec<f32> {
    assert_eq!(rhs.cs, 1, "matmul_few_rows: rhs rows must be contiguous");
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    assert!(
        k == 0 || lhs.last_index(m, k) < lhs.data.len(),
        "matmul_few_rows: lhs too short"
    );
    assert!(
        k == 0 || rhs.last_index(k, n) < rhs.data.len(),
        "matmul_few_rows: rhs too short"
    );
    let x = Operand {
        ptr: lhs.data.as_ptr(),
        rs: lhs.rs,
        cs: lhs.cs,
    };
    // SAFETY: the asserts keep every (row, k) of lhs and every (k, column < n) of rhs inside
    // the slices; the kernels read no column of a panel at or past n.
    unsafe {
        run_panels(Kernel::detect(), x, (m, k, n), |p, _| Operand {
            ptr: rhs.data.as_ptr().add(p * PANEL),
            rs: rhs.rs,
            cs: 1,
        })
    }
}

/// The widest output [`matmul_few_cols`] takes: three AVX-512 vectors.
pub(crate) const FEW_COLS: usize = 48;

/// Output rows per parallel task of [`matmul_few_cols`].
const FEW_COLS_TASK_ROWS: usize = 64;

/// `lhs` (m, k) times `rhs` (k, n), both row-major, for n ≤ [`FEW_COLS`]: the products into a LoRA
/// factor's rank, `x Aᵀ` and `g B`, whose outputs are at most three vectors wide. Each block of
/// eight rows keeps its accumulators in registers; per `k`, one load of `rhs` per vector
/// feeds eight multiply-adds. (The `gemm` crate took 0.3 ms for 512 x 8 x 576, mostly packing.)
pub(crate) fn matmul_few_cols(
    lhs: &[f32],
    rhs: &[f32],
    (m, k, n): (usize, usize, usize),
) -> Vec<f32> {
    assert!(
        n <= FEW_COLS,
        "matmul_few_cols: {n} columns, at most {FEW_COLS}"
    );
    assert_eq!(lhs.len(), m * k, "matmul_few_cols: lhs is not (m, k)");
    assert_eq!(rhs.len(), k * n, "matmul_few_cols: rhs is not (k, n)");
    let mut y = vec![0f32; m * n];
    if n == 0 {
        return y;
    }
    let kernel = Kernel::detect();
    let task = |(t, out): (usize, &mut [f32])| {
        let first = t * FEW_COLS_TASK_ROWS;
        let rows = out.len() / n;
        let x = &lhs[first * k..(first + rows) * k];
        match kernel {
            // SAFETY: AVX-512F was detected; x holds (rows, k), rhs (k, n), out (rows, n).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 if n <= 16 => unsafe {
                x86::few_cols_avx512::<1>(x, rhs, out, (rows, k, n))
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 if n <= 32 => unsafe {
                x86::few_cols_avx512::<2>(x, rhs, out, (rows, k, n))
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::few_cols_avx512::<3>(x, rhs, out, (rows, k, n)) },
            _ => few_cols_portable(x, rhs, out, (rows, k, n)),
        }
    };
    if m * k * n < 1 << 18 {
        y.chunks_mut(FEW_COLS_TASK_ROWS * n)
            .enumerate()
            .for_each(task);
    } else {
        y.par_chunks_mut(FEW_COLS_TASK_ROWS * n)
            .enumerate()
            .for_each(task);
    }
    y
}

/// [`matmul_few_cols`] in plain loops, with the same rounding as the vector kernel.
fn few_cols_portable(x: &[f32], rhs: &[f32], out: &mut [f32], (rows, k, n): (usize, usize, usize)) {
    for (xr, yr) in x
        .chunks_exact(k.max(1))
        .zip(out.chunks_exact_mut(n))
        .take(rows)
    {
        for (kk, &xv) in xr.iter().enumerate() {
            for (yv, w) in yr.iter_mut().zip(&rhs[kk * n..(kk + 1) * n]) {
                *yv = xv.mul_add(*w, *yv);
            }
        }
    }
}

/// A matrix operand as the kernels read it: element (i, j) at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

// SAFETY: an Operand only reads; the slices it points into outlive every parallel loop.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}

/// `x` (m, k) row-major times a matrix whose panels `panel(p, scratch)` produces on demand,
/// each as a pointer to k rows of [`PANEL`] contiguous values (a panel decoded into the
/// calling thread's `scratch`, which it may resize, or one stored elsewhere).
pub(crate) fn matmul_decoded_panels(
    x: &[f32],
    (m, k, n): (usize, usize, usize),
    panel: impl Fn(usize, &mut Vec<f32>) -> *const f32 + Sync,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "matmul_decoded_panels: x is not (m, k)");
    let lhs = Operand {
        ptr: x.as_ptr(),
        rs: k,
        cs: 1,
    };
    // SAFETY: x holds (m, k) row-major; `panel` returns k rows of PANEL readable values.
    unsafe {
        run_panels(Kernel::detect(), lhs, (m, k, n), |p, scratch| Operand {
            ptr: panel(p, scratch),
            rs: PANEL,
            cs: 1,
        })
    }
}

thread_local! {
    /// The panel a thread's current task decoded (see [`matmul_decoded_panels`]).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The (m, n) product of `lhs` (m, k) and the panels `panel(p, scratch)` returns (k rows of
/// [`PANEL`] columns, the last one cut at n), panel by panel, on rayon's threads when large.
/// `scratch` is the running thread's buffer, for panels decoded on the fly.
///
/// # Safety
/// Every (i < m, kk < k) of `lhs` and every (kk < k, j < cols of p) of each panel is readable
/// while the scratch it was given stays untouched.
unsafe fn run_panels(
    kernel: Kernel,
    lhs: Operand,
    (m, k, n): (usize, usize, usize),
    panel: impl Fn(usize, &mut Vec<f32>) -> Operand + Sync,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let out = SharedOut(y.as_mut_ptr());
    let one = |p: usize| {
        let first = p * PANEL;
        let cols = PANEL.min(n - first);
        SCRATCH.with_borrow_mut(|scratch| {
            let w = panel(p, scratch);
            // SAFETY: panel `p` writes only columns first..first+cols of each of the m rows of
            // y, which no other panel touches; y outlives the loop; `w` stays valid while
            // this closure holds the scratch.
            unsafe { kernel.panel(lhs, (m, k), w, out.at(first), n, cols) };
        });
    };
    // A weight element costs about as much to stream from memory as eight multiply-adds.
    // Below ~0.5 M such units a rayon hand-off costs more than the second core gains.
    let panels = n.div_ceil(PANEL);
    if k * n * (m + 8) < 1 << 19 {
        (0..panels).for_each(one);
    } else {
        (0..panels).into_par_iter().for_each(one);
    }
    y
}

/// The output pointer shared by the panel tasks (each writes its own columns).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// The element `offset` places on. (A method, so closures capture the whole `Sync`
    /// wrapper rather than its raw-pointer field.)
    ///
    /// # Safety
    /// `offset` must lie inside the allocation.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}
// SAFETY: tasks write disjoint elements; see `matmul_with`.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

    /// One panel for all `m` rows of `x`: `y[i * ldy + j] = x[i] · panel[.., j]` for `j < cols`.
    ///
    /// # Safety
    /// `y` must be valid for writes at `i * ldy + j` for every `i < m`, `j < cols`; `x` and
    /// `panel` readable at every (i < m, kk < k) and (kk < k, j < cols).
    unsafe fn panel(
        self,
        x: Operand,
        (m, k): (usize, usize),
        panel: Operand,
        y: *mut f32,
        ldy: usize,
        cols: usize,
    ) {
        let mut r = 0;
        while r < m {
            let rows = m - r;
            let b = Block {
                x: Operand {
                    ptr: x.ptr.add(r * x.rs),
                    ..x
                },
                k,
                panel,
                y: y.add(r * ldy),
                ldy,
                cols,
            };
            r += match self {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => match rows {
                    1 => x86::avx512::<1>(b),
                    2 => x86::avx512::<2>(b),
                    3 => x86::avx512::<3>(b),
                    4 => x86::avx512::<4>(b),
                    5 => x86::avx512::<5>(b),
                    6 => x86::avx512::<6>(b),
                    7 => x86::avx512::<7>(b),
                    _ => x86::avx512::<8>(b),
                },
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => match rows {
                    1 => x86::avx2::<1>(b),
                    2 => x86::avx2::<2>(b),
                    3 => x86::avx2::<3>(b),
                    _ => x86::avx2::<4>(b),
                },
                Kernel::Portable => portable(b, rows.min(4)),
            };
        }
    }
}

/// A block of rows against one panel, as the kernels take it: only the panel's first `cols`
/// columns are read and written; rows of `y` are `ldy` apart.
#[derive(Clone, Copy)]
struct Block {
    x: Operand,
    k: usize,
    panel: Operand,
    y: *mut f32,
    ldy: usize,
    cols: usize,
}

impl Block {
    /// Row `i`, column `kk` of the block's rows of x.
    ///
    /// # Safety
    /// Inside the operand, as [`Kernel::panel`] requires.
    #[inline(always)]
    unsafe fn x_at(&self, i: usize, kk: usize) -> f32 {
        *self.x.ptr.add(i * self.x.rs + kk * self.x.cs)
    }

    /// The start of the panel's row `kk`.
    ///
    /// # Safety
    /// As [`Self::x_at`].
    #[inline(always)]
    unsafe fn panel_row(&self, kk: usize) -> *const f32 {
        self.panel.ptr.add(kk * self.panel.rs)
    }
}

/// Plain loops with the same rounding as the vector kernels (one fused multiply-add per term).
/// Returns the rows done.
///
/// # Safety
/// As [`Kernel::panel`], for `rows` rows.
unsafe fn portable(b: Block, rows: usize) -> usize {
    for i in 0..rows {
        let mut acc = [0f32; PANEL];
        for kk in 0..b.k {
            let (xv, w) = (b.x_at(i, kk), b.panel_row(kk));
            for (j, a) in acc.iter_mut().enumerate().take(b.cols) {
                *a = xv.mul_add(*w.add(j), *a);
            }
        }
        for (j, a) in acc.iter().enumerate().take(b.cols) {
            *b.y.add(i * b.ldy + j) = *a;
        }
    }
    rows
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Block;
    use std::arch::x86_64::*;

    /// The lanes of a 16-wide vector that hold columns `first..cols`.
    #[inline(always)]
    fn mask16(first: usize, cols: usize) -> __mmask16 {
        let left = cols.saturating_sub(first);
        if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }

    /// `R` rows by one panel: 3R accumulators, three weight vectors per `k` (masked past
    /// `cols`, so a panel read in place never reads beyond its matrix). Returns `R`.
    ///
    /// # Safety
    /// As [`super::Kernel::panel`], for `R` rows; AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512<const R: usize>(b: Block) -> usize {
        let masks = [mask16(0, b.cols), mask16(16, b.cols), mask16(32, b.cols)];
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        for kk in 0..b.k {
            let w = b.panel_row(kk);
            let w0 = _mm512_maskz_loadu_ps(masks[0], w);
            let w1 = _mm512_maskz_loadu_ps(masks[1], w.add(16));
            let w2 = _mm512_maskz_loadu_ps(masks[2], w.add(32));
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(b.x_at(i, kk));
                a[0] = _mm512_fmadd_ps(x, w0, a[0]);
                a[1] = _mm512_fmadd_ps(x, w1, a[1]);
                a[2] = _mm512_fmadd_ps(x, w2, a[2]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (v, (part, mask)) in a.iter().zip(masks).enumerate() {
                _mm512_mask_storeu_ps(b.y.add(i * b.ldy + v * 16), mask, *part);
            }
        }
        R
    }

    /// `R` rows by one panel, sixteen columns at a time (AVX2 has sixteen registers): 2R
    /// accumulators, two weight vectors per `k`. Returns `R`.
    ///
    /// # Safety
    /// As [`super::Kernel::panel`], for `R` rows; AVX2 and FMA present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<const R: usize>(b: Block) -> usize {
        let lane_mask = |first: usize| {
            let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(b.cols as i32 - first as i32), idx)
        };
        for first in (0..b.cols).step_by(16) {
            let (m0, m1) = (lane_mask(first), lane_mask(first + 8));
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for kk in 0..b.k {
                let w = b.panel_row(kk).add(first);
                let w0 = _mm256_maskload_ps(w, m0);
                let w1 = _mm256_maskload_ps(w.add(8), m1);
                for (i, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_ps(b.x_at(i, kk));
                    a[0] = _mm256_fmadd_ps(x, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(x, w1, a[1]);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let y = b.y.add(i * b.ldy + first);
                _mm256_maskstore_ps(y, m0, a[0]);
                _mm256_maskstore_ps(y.add(8), m1, a[1]);
            }
        }
        R
    }

    /// [`super::matmul_few_cols`] for one task's rows: blocks of eight rows, `NV` accumulator
    /// vectors each (lanes past `n` masked off).
    ///
    /// # Safety
    /// AVX-512F present; `x` holds (rows, k), `rhs` (k, n) and `out` (rows, n), n ≤ 16 NV.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn few_cols_avx512<const NV: usize>(
        x: &[f32],
        rhs: &[f32],
        out: &mut [f32],
        (rows, k, n): (usize, usize, usize),
    ) {
        let masks: [__mmask16; NV] = std::array::from_fn(|v| mask16(16 * v, n));
        let mut r = 0;
        while r < rows {
            let block = (rows - r).min(8);
            let xp = x.as_ptr().add(r * k);
            let mut acc = [[_mm512_setzero_ps(); NV]; 8];
            for kk in 0..k {
                let wp = rhs.as_ptr().add(kk * n);
                let w: [__m512; NV] =
                    std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], wp.add(16 * v)));
                for (i, a) in acc.iter_mut().enumerate().take(block) {
                    let xv = _mm512_set1_ps(*xp.add(i * k + kk));
                    for (av, wv) in a.iter_mut().zip(&w) {
                        *av = _mm512_fmadd_ps(xv, *wv, *av);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(block) {
                let yp = out.as_mut_ptr().add((r + i) * n);
                for (v, av) in a.iter().enumerate() {
                    _mm512_mask_storeu_ps(yp.add(16 * v), masks[v], *av);
                }
            }
            r += block;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, salt: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761).wrapping_add(salt) >> 16) % 200) as f32 / 100.0
                    - 1.0
            })
            .collect()
    }

    fn kernels() -> Vec<Kernel> {
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                all.push(Kernel::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                all.push(Kernel::Avx512);
            }
        }
        all
    }

    #[test]
    fn every_kernel_gives_the_fused_chain_bits_for_ragged_shapes() {
        for (m, k, n) in [
            (1, 5, 3),
            (3, 17, 64),
            (4, 64, 130),
            (9, 33, 200),
            (16, 40, 97),
        ] {
            let x = values(m * k, 1);
            let w = values(k * n, 2);
            let packed = PanelMatrix::from_in_out(&w, k, n);
            let want: Vec<f32> = (0..m * n)
                .map(|e| {
                    let (i, j) = (e / n, e % n);
                    (0..k).fold(0f32, |acc, kk| x[i * k + kk].mul_add(w[kk * n + j], acc))
                })
                .collect();
            for kernel in kernels() {
                assert_eq!(
                    packed.matmul_with(kernel, &x, m),
                    want,
                    "{kernel:?} {m}x{k}x{n}"
                );
            }
        }
    }

    #[test]
    fn packing_the_transpose_gives_the_same_matrix() {
        let (k, n) = (23, 101);
        let w = values(k * n, 5);
        let wt: Vec<f32> = (0..n * k).map(|e| w[(e % k) * n + e / k]).collect();
        let a = PanelMatrix::from_in_out(&w, k, n);
        let b = PanelMatrix::from_out_in(&wt, n, k);
        assert_eq!(a.data, b.data);
        assert_eq!((b.k, b.n()), (k, n));
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let (m, k, n) = (16, 50, 150);
        let x = values(m * k, 3);
        let packed = PanelMatrix::from_in_out(&values(k * n, 4), k, n);
        let batch = packed.matmul(&x, m);
        for row in 0..m {
            let alone = packed.matmul(&x[row * k..(row + 1) * k], 1);
            assert_eq!(alone, batch[row * n..(row + 1) * n]);
        }
    }

    fn chain(
        x: impl Fn(usize, usize) -> f32,
        w: impl Fn(usize, usize) -> f32,
        (m, k, n): (usize, usize, usize),
    ) -> Vec<f32> {
        (0..m * n)
            .map(|e| (0..k).fold(0f32, |acc, kk| x(e / n, kk).mul_add(w(kk, e % n), acc)))
            .collect()
    }

    #[test]
    fn few_rows_read_a_transposed_lhs_and_a_ragged_rhs_in_place() {
        for (m, k, n) in [(8, 512, 576), (3, 7, 50), (8, 33, 1)] {
            // lhs is the transpose of a (k, m) row-major matrix, as a LoRA gradient reads it.
            let lhs_t = values(k * m, 6);
            let rhs = values(k * n, 7);
            let got = matmul_few_rows(
                MatRef::rows(&lhs_t, m).t(),
                MatRef::rows(&rhs, n),
                (m, k, n),
            );
            let want = chain(
                |i, kk| lhs_t[kk * m + i],
                |kk, j| rhs[kk * n + j],
                (m, k, n),
            );
            assert_eq!(got, want, "{m}x{k}x{n}");
        }
    }

    #[test]
    fn few_cols_match_the_fused_chain() {
        for (m, k, n) in [
            (512, 576, 8),
            (9, 40, 1),
            (70, 13, 16),
            (17, 21, 32),
            (5, 8, 48),
        ] {
            let x = values(m * k, 8);
            let w = values(k * n, 9);
            let got = matmul_few_cols(&x, &w, (m, k, n));
            let want = chain(|i, kk| x[i * k + kk], |kk, j| w[kk * n + j], (m, k, n));
            assert_eq!(got, want, "{m}x{k}x{n}");
            let mut portable = vec![0f32; m * n];
            few_cols_portable(&x, &w, &mut portable, (m, k, n));
            assert_eq!(portable, want, "portable {m}x{k}x{n}");
        }
    }
}
