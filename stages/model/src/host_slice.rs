//! A CPU tensor's f32 data borrowed in place, for the hand-written CPU ops (AdamW's update,
//! RMSNorm, token log-probabilities), which read storage candle hands them without copying it.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

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

/// Call `f` with `t`'s f32 values, borrowed in place when `t` is a contiguous CPU tensor (a
/// backward pass's usual case) and copied into a contiguous tensor first otherwise.
pub(crate) fn with_f32<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(f32_slice(cpu, layout, op, "tensor")?)),
        _ => Err(candle_core::Error::Msg(format!("{op} needs a CPU tensor"))),
    }
}
