//! A CPU tensor's f32 data borrowed in place, for the hand-written CPU ops (AdamW's update,
//! RMSNorm, token log-probabilities), which read storage candle hands them without copying it.

use candle_core::{CpuStorage, Layout};

/// The contiguous f32 values `layout` selects in `storage`; an error naming `op` and `what`
/// otherwise.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => Err(candle_core::Error::Msg(format!(
            "{op} needs a contiguous f32 {what}"
        ))),
    }
}
