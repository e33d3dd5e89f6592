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

use std::sync::{Arc, Mutex};

use candle_core::{Tensor, TensorId};
use rayon::prelude::*;

use crate::host_slice::with_f32;

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
        let mut y = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return y;
        }
        let out = SharedOut(y.as_mut_ptr());
        let panel_len = k * PANEL;
        let panels = n.div_ceil(PANEL);
        let one = |p: usize| {
            let first = p * PANEL;
            let cols = PANEL.min(n - first);
            let panel = &self.data[p * panel_len..(p + 1) * panel_len];
            // SAFETY: panel `p` writes only columns first..first+cols of each of the m rows of
            // y, which no other panel touches; y outlives the loop.
            unsafe { kernel.panel(x, m, k, panel, out.at(first), n, cols) };
        };
        // A weight element costs about as much to stream from memory as eight multiply-adds.
        // Below ~0.5 M such units a rayon hand-off costs more than the second core gains.
        if k * n * (m + 8) < 1 << 19 {
            (0..panels).for_each(one);
        } else {
            (0..panels).into_par_iter().for_each(one);
        }
        y
    }
}

/// How a weight tensor holds the matrix to pack.
#[derive(Clone, Copy)]
pub(crate) enum Stored {
    /// (k, n): a projection's transposed weight.
    InOut,
    /// (n, k): an embedding used as output head.
    OutIn,
}

/// A frozen weight's packed copy, made on the first decode step that needs it and tagged with
/// the id of the tensor it was packed from, so a replaced weight never meets a stale copy.
#[derive(Default)]
pub(crate) struct PanelCache(Mutex<Option<(TensorId, Arc<PanelMatrix>)>>);

impl PanelCache {
    /// The packed copy of `w` (a 2-D f32 CPU tensor, laid out as `stored` says).
    pub(crate) fn get(&self, w: &Tensor, stored: Stored) -> candle_core::Result<Arc<PanelMatrix>> {
        let mut slot = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("packed weight lock poisoned".into()))?;
        if let Some((id, packed)) = &*slot {
            if *id == w.id() {
                return Ok(packed.clone());
            }
        }
        let (rows, cols) = w.dims2()?;
        let packed = Arc::new(with_f32(w, "panel packing", |data| match stored {
            Stored::InOut => PanelMatrix::from_in_out(data, rows, cols),
            Stored::OutIn => PanelMatrix::from_out_in(data, rows, cols),
        })?);
        *slot = Some((w.id(), packed.clone()));
        Ok(packed)
    }
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
    /// `y` must be valid for writes at `i * ldy + j` for every `i < m`, `j < cols`; `x` holds
    /// (m, k) and `panel` (k, PANEL).
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel(
        self,
        x: &[f32],
        m: usize,
        k: usize,
        panel: &[f32],
        y: *mut f32,
        ldy: usize,
        cols: usize,
    ) {
        let mut r = 0;
        while r < m {
            let rows = m - r;
            let b = Block {
                x: x[r * k..].as_ptr(),
                k,
                panel: panel.as_ptr(),
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

/// A block of rows against one panel, as the kernels take it: rows of `x` are `k` apart, rows
/// of `y` `ldy` apart, and only the panel's first `cols` columns are written.
#[derive(Clone, Copy)]
struct Block {
    x: *const f32,
    k: usize,
    panel: *const f32,
    y: *mut f32,
    ldy: usize,
    cols: usize,
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
            let xv = *b.x.add(i * b.k + kk);
            for (j, a) in acc.iter_mut().enumerate() {
                *a = xv.mul_add(*b.panel.add(kk * PANEL + j), *a);
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
    use super::{Block, PANEL};
    use std::arch::x86_64::*;

    /// `R` rows by one panel: 3R accumulators, three weight vectors per `k`. Returns `R`.
    ///
    /// # Safety
    /// As [`super::Kernel::panel`], for `R` rows; AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512<const R: usize>(b: Block) -> usize {
        let Block {
            x,
            k,
            panel,
            y,
            ldy,
            cols,
        } = b;
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        for kk in 0..k {
            let w = panel.add(kk * PANEL);
            let w0 = _mm512_loadu_ps(w);
            let w1 = _mm512_loadu_ps(w.add(16));
            let w2 = _mm512_loadu_ps(w.add(32));
            for (i, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*x.add(i * k + kk));
                a[0] = _mm512_fmadd_ps(b, w0, a[0]);
                a[1] = _mm512_fmadd_ps(b, w1, a[1]);
                a[2] = _mm512_fmadd_ps(b, w2, a[2]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (v, part) in a.iter().enumerate() {
                let first = v * 16;
                if first >= cols {
                    break;
                }
                let left = cols - first;
                let mask: __mmask16 = if left >= 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                _mm512_mask_storeu_ps(y.add(i * ldy + first), mask, *part);
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
        let Block {
            x,
            k,
            panel,
            y,
            ldy,
            cols,
        } = b;
        for first in (0..cols).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for kk in 0..k {
                let w = panel.add(kk * PANEL + first);
                let w0 = _mm256_loadu_ps(w);
                let w1 = _mm256_loadu_ps(w.add(8));
                for (i, a) in acc.iter_mut().enumerate() {
                    let b = _mm256_set1_ps(*x.add(i * k + kk));
                    a[0] = _mm256_fmadd_ps(b, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(b, w1, a[1]);
                }
            }
            let width = (cols - first).min(16);
            for (i, a) in acc.iter().enumerate() {
                let mut lanes = [0f32; 16];
                _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), a[1]);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), y.add(i * ldy + first), width);
            }
        }
        R
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
}
