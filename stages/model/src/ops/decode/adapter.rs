//! An adapter's share added on the host, for the few rows of a decode step.

use candle_core::Tensor;

use crate::ops::cpu::{with_f32s, PanelMatrix};

/// Adds an adapter's share, `scale · (x Aᵀ) Bᵀ`, to `y` (rows, n) on the host: `x` is
/// (rows, k), `a` (r, k) and `b` (n, r), all row-major. Both factors go through the panel
/// kernel (packing them costs less than one pass over `x`), so each row is computed on its
/// own, vectorised. (Plain iterator sums here were a strict f32 chain the compiler may not
/// vectorise: they took 70 % of a GRPO rollout's main-thread time.)
pub(crate) fn add_adapter(
    y: &mut [f32],
    x: &[f32],
    (a, b): (&Tensor, &Tensor),
    dims: (usize, usize, usize),
    scale: f32,
) -> candle_core::Result<()> {
    with_f32s([a, b], "adapter", |[a, b]| {
        add_host(y, x, (a, b), dims, scale)
    })
}

fn add_host(
    y: &mut [f32],
    x: &[f32],
    (a, b): (&[f32], &[f32]),
    (rows, k, n): (usize, usize, usize),
    scale: f32,
) {
    let r = a.len() / k.max(1);
    let down = PanelMatrix::from_out_in(a, r, k).matmul(x, rows);
    let up = PanelMatrix::from_out_in(b, n, r).matmul(&down, rows);
    for (yv, u) in y.iter_mut().zip(&up) {
        *yv += scale * u;
    }
}
