//! A copy derived from a frozen weight (packed, transposed), made on first use and kept.

use std::sync::{Arc, Mutex};

use candle_core::{Tensor, TensorId};

/// The copy is tagged with the id of the tensor it was made from, so a replaced weight never
/// meets a stale copy. (Only for frozen weights: a `Var` updated in place keeps its id.)
pub(crate) struct DerivedCopy<T>(Mutex<Option<(TensorId, Arc<T>)>>);

impl<T> Default for DerivedCopy<T> {
    fn default() -> Self {
        DerivedCopy(Mutex::new(None))
    }
}

impl<T> DerivedCopy<T> {
    /// The copy of `w`, made by `make` when there is none for this tensor yet.
    pub(crate) fn get(
        &self,
        w: &Tensor,
        make: impl FnOnce(&Tensor) -> candle_core::Result<T>,
    ) -> candle_core::Result<Arc<T>> {
        let mut slot = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("derived weight copy lock poisoned".into()))?;
        if let Some((id, copy)) = &*slot {
            if *id == w.id() {
                return Ok(copy.clone());
            }
        }
        let copy = Arc::new(make(w)?);
        *slot = Some((w.id(), copy.clone()));
        Ok(copy)
    }
}
