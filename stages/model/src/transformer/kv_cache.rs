//! The preallocated keys and values of a batch being generated or scored.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;

/// Preallocated per-layer key/value storage for a batch: (b, kv_heads, capacity, head_dim).
pub(crate) struct KvCache {
    pub(super) k: Vec<Tensor>,
    pub(super) v: Vec<Tensor>,
    /// Filled slots (the same for every row: rows are padded, not ragged).
    pub(crate) len: usize,
    capacity: usize,
}

impl KvCache {
    fn new(
        cfg: &ModelConfig,
        (dtype, device): (DType, &Device),
        batch: usize,
        capacity: usize,
    ) -> Result<Self> {
        let shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim);
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    /// A cache for `batch` rows whose first slots hold `prefix`'s keys and values (a one-row
    /// cache) in every row; an empty cache without a prefix.
    pub(super) fn starting_with(
        prefix: Option<&KvCache>,
        cfg: &ModelConfig,
        place: (DType, &Device),
        batch: usize,
        capacity: usize,
    ) -> Result<Self> {
        let mut cache = Self::new(cfg, place, batch, capacity)?;
        let Some(prefix) = prefix else {
            return Ok(cache);
        };
        let n = prefix.len;
        if n > capacity {
            bail!("internal: a {n}-slot prefix does not fit a {capacity}-slot cache");
        }
        for (dst, src) in cache
            .k
            .iter_mut()
            .chain(cache.v.iter_mut())
            .zip(prefix.k.iter().chain(prefix.v.iter()))
        {
            let (_, heads, _, dim) = src.dims4()?;
            let rows = src.narrow(2, 0, n)?.broadcast_as((batch, heads, n, dim))?;
            dst.slice_set(&rows.contiguous()?, 2, 0)?;
        }
        cache.len = n;
        Ok(cache)
    }

    /// Write this step's keys/values at `self.len` and return views of everything so far.
    pub(super) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if self.len + t > self.capacity {
            bail!(
                "KV cache overflow: {} + {t} positions exceed its capacity {}",
                self.len,
                self.capacity
            );
        }
        self.k[layer].slice_set(&k.contiguous()?, 2, self.len)?;
        self.v[layer].slice_set(&v.contiguous()?, 2, self.len)?;
        let total = self.len + t;
        Ok((
            self.k[layer].narrow(2, 0, total)?,
            self.v[layer].narrow(2, 0, total)?,
        ))
    }

    /// Keep only the given batch rows (finished generations are dropped from the batch).
    pub(crate) fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let idx = Tensor::new(rows, self.k[0].device())?;
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(&idx, 0)?;
        }
        Ok(())
    }
}
