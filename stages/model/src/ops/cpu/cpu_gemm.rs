//! f32 GEMM on strided views of host slices, for the hand-written CPU ops.
//!
//! Going through candle's `matmul` from inside an op costs a zero-filled output, a tensor per
//! intermediate, a separate pass for every scale or sum, and a look-up of the thread count in
//! the environment on each call. The `gemm` crate candle itself uses takes any row and column
//! strides, scales the product and can add it to what the destination holds, so a transpose is
//! a swap of strides and `y += s * a b` is one call.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with `cols` columns.
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        MatRef {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose: the same data with the strides swapped.
    pub(crate) fn t(self) -> Self {
        MatRef {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    pub(crate) fn last_index(&self, rows: usize, cols: usize) -> usize {
        (rows - 1) * self.rs + (cols - 1) * self.cs
    }
}

/// Products smaller than this many multiply-adds run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// `dst (m x n, row-major with row stride dst_rs) = [dst +] beta · a (m x k) · b (k x n)`,
/// adding to `dst` when `accumulate`. Large products use rayon's threads unless `serial`
/// (a caller already running on one of them per task).
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    (a, b): (MatRef, MatRef),
    (accumulate, beta): (bool, f32),
    serial: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n - 1 < dst.len(),
        "gemm_into: dst too short"
    );
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        a.last_index(m, k) < a.data.len(),
        "gemm_into: lhs too short"
    );
    assert!(
        b.last_index(k, n) < b.data.len(),
        "gemm_into: rhs too short"
    );
    let parallelism = if serial || m * n * k < PARALLEL_MIN_MACS {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // SAFETY: the asserts above keep every element gemm touches inside the three slices, and
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A new row-major (m x n) matrix `beta · a · b`.
pub(crate) fn gemm_new(
    (m, n, k): (usize, usize, usize),
    a: MatRef,
    b: MatRef,
    beta: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    gemm_into(&mut out, n, (m, n, k), (a, b), (false, beta), false);
    out
}

/// Call `f` with a 2-D CPU f32 tensor as a [`MatRef`] over its storage (any strides, no copy).
pub(crate) fn with_matrix<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(MatRef) -> R,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(matrix(cpu, layout, op)?)),
        _ => Err(candle_core::Error::Msg(format!("{op} needs a CPU tensor"))),
    }
}

/// A 2-D f32 storage view as a [`MatRef`].
pub(crate) fn matrix<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<MatRef<'a>> {
    let CpuStorage::F32(data) = storage else {
        return Err(candle_core::Error::Msg(format!("{op} needs f32 tensors")));
    };
    let (rows, cols) = layout.shape().dims2()?;
    let stride = layout.stride();
    let view = MatRef {
        data: &data[layout.start_offset()..],
        rs: stride[0],
        cs: stride[1],
    };
    if rows > 0 && cols > 0 && view.last_index(rows, cols) >= view.data.len() {
        return Err(candle_core::Error::Msg(format!(
            "{op}: a {rows}x{cols} view runs past its storage"
        )));
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_scaled_and_accumulated_products_match_plain_sums() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        // b stored transposed: (n, k) row-major, read as (k, n).
        let bt: Vec<f32> = (0..n * k).map(|i| 1.0 - i as f32 * 0.25).collect();
        let plain =
            |i: usize, j: usize| -> f32 { (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum() };
        let y = gemm_new(
            (m, n, k),
            MatRef::rows(&a, k),
            MatRef::rows(&bt, k).t(),
            2.0,
        );
        let mut acc = vec![1f32; m * n];
        gemm_into(
            &mut acc,
            n,
            (m, n, k),
            (MatRef::rows(&a, k), MatRef::rows(&bt, k).t()),
            (true, 1.0),
            true,
        );
        for i in 0..m {
            for j in 0..n {
                assert_eq!(y[i * n + j], 2.0 * plain(i, j));
                assert_eq!(acc[i * n + j], 1.0 + plain(i, j));
            }
        }
    }
}
