//! Host kernels in f32: GEMM on strided views, products with weights packed into panels (or
//! kept as 4/8-bit codes), softmax row statistics, and borrowing a CPU tensor's storage.
//!
//! Called only by `ops::train`, `ops::decode`, the optimiser's fused AdamW update and `bench`;
//! nothing here knows about models, graphs or modes.

mod coded_panels;
mod cpu_gemm;
mod host_slice;
mod panel_matmul;
mod softmax_rows;

pub(crate) use coded_panels::CodedPanels;
pub(crate) use cpu_gemm::{gemm_into, gemm_new, matrix, with_matrix, MatRef};
pub(crate) use host_slice::{f32_slice, with_f32, with_f32s};
pub(crate) use panel_matmul::{matmul_few_cols, matmul_few_rows, PanelMatrix, FEW_COLS};
pub(crate) use softmax_rows::{exp_nonpositive, lane_sum, row_sums, row_sums_of, RowSums};
