//! The copy of a frozen weight that decode steps multiply by: its codes where the values came
//! from a block-quantised file (see [`CodedPanels`]), else its f32 panels.

use std::sync::Arc;

use candle_core::Tensor;

use crate::ops::cpu::with_f32;
use crate::ops::cpu::CodedPanels;
use crate::ops::cpu::PanelMatrix;
use crate::ops::derived_copy::DerivedCopy;

/// A weight ready for products with the few rows of a decode step.
pub(crate) enum DecodeWeight {
    Coded(CodedPanels),
    Panels(PanelMatrix),
}

impl DecodeWeight {
    /// Output width.
    pub(crate) fn n(&self) -> usize {
        match self {
            DecodeWeight::Coded(c) => c.n(),
            DecodeWeight::Panels(p) => p.n(),
        }
    }

    /// `x` (m, k) row-major times the weight: the (m, n) product, the same bits either way.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        match self {
            DecodeWeight::Coded(c) => c.matmul(x, m),
            DecodeWeight::Panels(p) => p.matmul(x, m),
        }
    }

    /// Bits per stored element: the codes' 4 or 8, or 32 for f32 panels.
    pub(crate) fn bits(&self) -> usize {
        match self {
            DecodeWeight::Coded(c) => c.code_bits(),
            DecodeWeight::Panels(_) => 32,
        }
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

/// A frozen weight's decode copy, made on first use.
pub(crate) type PanelCache = DerivedCopy<DecodeWeight>;

impl PanelCache {
    /// The decode copy of `w` (a 2-D f32 CPU tensor, laid out as `stored` says).
    pub(crate) fn packed(
        &self,
        w: &Tensor,
        stored: Stored,
    ) -> candle_core::Result<Arc<DecodeWeight>> {
        self.get(w, |w| {
            let (rows, cols) = w.dims2()?;
            with_f32(w, "decode packing", |data| {
                let coded = match stored {
                    Stored::InOut => CodedPanels::find(|kk, j| data[kk * cols + j], rows, cols),
                    Stored::OutIn => CodedPanels::find(|kk, j| data[j * cols + kk], cols, rows),
                };
                coded.map(DecodeWeight::Coded).unwrap_or_else(|| {
                    DecodeWeight::Panels(match stored {
                        Stored::InOut => PanelMatrix::from_in_out(data, rows, cols),
                        Stored::OutIn => PanelMatrix::from_out_in(data, rows, cols),
                    })
                })
            })
        })
    }
}
