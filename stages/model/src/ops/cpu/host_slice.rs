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

/// [`with_f32`] for several tensors at once: `f` gets their values in the order given.
pub(crate) fn with_f32s<const N: usize, R>(
    tensors: [&Tensor; N],
    op: &str,
    f: impl FnOnce([&[f32]; N]) -> R,
) -> candle_core::Result<R> {
    let owned = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(cpu) => slices.push(f32_slice(cpu, layout, op, "tensor")?),
            _ => return Err(candle_core::Error::Msg(format!("{op} needs CPU tensors"))),
        }
    }
    let slices: [&[f32]; N] = slices
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{op}: tensor count changed")))?;
    Ok(f(slices))
}
