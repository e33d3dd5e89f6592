//! A frozen weight that a block-quantised file dequantised, multiplied from its 4- or 8-bit
//! codes in decode steps.
//!
//! Decoding a few rows is bound by streaming weights from memory: SmolLM2's 540 MB of f32
//! weights per step at ~18 GB/s cap batch-1 decode near 33 tokens/s. A weight read from a
//! GGUF Q4_1 tensor carries 4.5 bits of information per element in those 32, so here each
//! panel of [`PANEL`] columns is stored as codes plus per-block scales (0.75 bytes per element
//! for 4-bit codes) and decoded into the running thread's scratch just before the panel kernel
//! reads it. The products keep [`PanelMatrix`](crate::ops::cpu::PanelMatrix)'s bits:
//! a decoded panel is that panel, exactly.
//!
//! The codes are found from the f32 values rather than carried from the file. For each block
//! of [`GROUP`] consecutive `k` in a column we search a scale `d` and offset `m` such that
//! every value equals `q * d + m` for an integer code `q`, with the product and the sum each
//! rounded to f32 (the arithmetic of the dequantisers: GGUF's Q4_1 is `q * d + m` with f16
//! `d` and `m`; Q8_0, Q4_0 and Q5_0 are `q * d`, which is `q * d + (-0.0)` bit for bit). Each
//! candidate is checked against every value's bits, so a weight with any block that fits no
//! code (trained or HF f32 weights) keeps its f32 panels. Working from the values keeps the
//! rule in one place: no loader, transposition or row permutation needs to know about codes,
//! and a weight replaced by other values can never meet stale ones.

use half::f16;
use rayon::prelude::*;

use super::panel_matmul::{matmul_decoded_panels, PANEL};

/// Consecutive `k` that share a scale and an offset (GGUF's block length).
pub(crate) const GROUP: usize = 32;

/// How a block's codes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// Codes 0..=15: rows `2i` and `2i + 1` of a group in the low and high nibble of one byte.
    Nibbles,
    /// Codes -128..=127, one signed byte per element; the offset is always -0.0.
    Bytes,
}

impl Form {
    /// Byte rows of [`PANEL`] codes per group.
    fn code_rows(self) -> usize {
        match self {
            Form::Nibbles => GROUP / 2,
            Form::Bytes => GROUP,
        }
    }

    /// A scale, an offset and codes that give exactly `block`'s values, if this form has them.
    fn fit(self, block: &[f32; GROUP]) -> Option<(f32, f32, [u8; GROUP])> {
        if block.iter().any(|v| !v.is_finite()) {
            return None;
        }
        match self {
            Form::Nibbles => {
                let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                scale_candidates((hi - lo) / 15.0)
                    .into_iter()
                    .find_map(|d| codes_for(block, d, lo, (0, 15)).map(|q| (d, lo, q)))
            }
            Form::Bytes => {
                let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                // Q8_0 reaches |q| = 127; Q4_0 and Q5_0 put their largest value at -8 and -16.
                [127.0, 8.0, 16.0]
                    .into_iter()
                    .flat_map(|top| scale_candidates(amax / top))
                    .flat_map(|d| [d, -d])
                    .find_map(|d| codes_for(block, d, -0.0, (-128, 127)).map(|q| (d, -0.0, q)))
            }
        }
    }
}

/// Scales worth trying for an estimate `est` of a block's scale. The estimates assume a block
/// spans its code range, as llama.cpp's reference quantisers make it: Q4_1 puts a block's
/// minimum at code 0 and its maximum at 15, Q8_0 its largest magnitude at ±127. A block made
/// otherwise is not found and its weight keeps f32 panels. Tried in order: the f16 values next
/// to it (GGUF stores scales as f16) and the f32 values next to it (scales that are products).
fn scale_candidates(est: f32) -> Vec<f32> {
    if !est.is_finite() {
        return Vec::new();
    }
    if est == 0.0 {
        return vec![0.0];
    }
    let h = f16::from_f32(est).to_bits();
    let b = est.to_bits();
    [h, h.wrapping_add(1), h.wrapping_sub(1)]
        .map(|h| f16::from_bits(h).to_f32())
        .into_iter()
        .chain([b, b + 1, b - 1, b + 2, b - 2].map(f32::from_bits))
        .filter(|d| d.is_finite() && *d > 0.0)
        .collect()
}

/// The codes in `lo..=hi` giving each value of `block` as `q * d + m` (each step rounded to
/// f32), as bytes (two's complement for negative codes); None when one value has no such code.
fn codes_for(block: &[f32; GROUP], d: f32, m: f32, (lo, hi): (i32, i32)) -> Option<[u8; GROUP]> {
    let mut codes = [0u8; GROUP];
    for (code, &v) in codes.iter_mut().zip(block) {
        let q = if d == 0.0 {
            0.0
        } else {
            ((v - m) / d).round().clamp(lo as f32, hi as f32)
        };
        if (q * d + m).to_bits() != v.to_bits() {
            return None;
        }
        *code = q as i32 as u8;
    }
    Some(codes)
}

/// A (k, n) matrix as codes in panels of [`PANEL`] columns, [`GROUP`] rows of `k` per block.
pub(crate) struct CodedPanels {
    k: usize,
    n: usize,
    form: Form,
    /// Per panel, per group: [`PANEL`] scales, then [`PANEL`] offsets (zero past `n`).
    scales: Vec<f32>,
    /// Per panel, per group: `form.code_rows()` rows of [`PANEL`] code bytes.
    codes: Vec<u8>,
}

impl CodedPanels {
    /// The codes of the (k, n) matrix whose element (kk, j) is `value(kk, j)`, in the narrowest
    /// form that holds every value exactly; None when no form does.
    pub(crate) fn find(
        value: impl Fn(usize, usize) -> f32 + Sync,
        k: usize,
        n: usize,
    ) -> Option<Self> {
        if k == 0 || n == 0 || !k.is_multiple_of(GROUP) {
            return None;
        }
        [Form::Nibbles, Form::Bytes]
            .into_iter()
            .find_map(|form| Self::encode(form, &value, k, n))
    }

    fn encode(
        form: Form,
        value: &(impl Fn(usize, usize) -> f32 + Sync),
        k: usize,
        n: usize,
    ) -> Option<Self> {
        let groups = k / GROUP;
        let panels: Option<Vec<(Vec<f32>, Vec<u8>)>> = (0..n.div_ceil(PANEL))
            .into_par_iter()
            .map(|p| {
                let first = p * PANEL;
                let mut scales = vec![0f32; groups * 2 * PANEL];
                let mut codes = vec![0u8; groups * form.code_rows() * PANEL];
                let mut block = [0f32; GROUP];
                for g in 0..groups {
                    let (d_row, m_row) = (2 * g * PANEL, (2 * g + 1) * PANEL);
                    let code_rows = &mut codes[g * form.code_rows() * PANEL..];
                    for c in 0..PANEL.min(n - first) {
                        for (r, v) in block.iter_mut().enumerate() {
                            *v = value(g * GROUP + r, first + c);
                        }
                        let (d, m, q) = form.fit(&block)?;
                        scales[d_row + c] = d;
                        scales[m_row + c] = m;
                        match form {
                            Form::Nibbles => {
                                for (i, pair) in q.chunks_exact(2).enumerate() {
                                    code_rows[i * PANEL + c] = pair[0] | pair[1] << 4;
                                }
                            }
                            Form::Bytes => {
                                for (r, &code) in q.iter().enumerate() {
                                    code_rows[r * PANEL + c] = code;
                                }
                            }
                        }
                    }
                }
                Some((scales, codes))
            })
            .collect();
        let (scales, codes): (Vec<Vec<f32>>, Vec<Vec<u8>>) = panels?.into_iter().unzip();
        Some(CodedPanels {
            k,
            n,
            form,
            scales: scales.concat(),
            codes: codes.concat(),
        })
    }

    /// Output width.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Bits per element of the codes (4 or 8).
    pub(crate) fn code_bits(&self) -> usize {
        match self.form {
            Form::Nibbles => 4,
            Form::Bytes => 8,
        }
    }

    /// `x` (m, k) row-major times the matrix: the (m, n) product, row-major, with the bits
    /// of the f32 panel kernel on the decoded values.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        matmul_decoded_panels(x, (m, self.k, self.n), |p, scratch| {
            scratch.resize(self.k * PANEL, 0.0);
            self.decode_panel(p, scratch);
            scratch.as_ptr()
        })
    }

    /// Panel `p` as k rows of [`PANEL`] f32 values into `out`.
    fn decode_panel(&self, p: usize, out: &mut [f32]) {
        let groups = self.k / GROUP;
        let code_len = self.form.code_rows() * PANEL;
        let scales = &self.scales[p * groups * 2 * PANEL..][..groups * 2 * PANEL];
        let codes = &self.codes[p * groups * code_len..][..groups * code_len];
        #[cfg(target_arch = "x86_64")]
        let avx512 = is_x86_feature_detected!("avx512f");
        for ((scales, codes), out) in scales
            .chunks_exact(2 * PANEL)
            .zip(codes.chunks_exact(code_len))
            .zip(out.chunks_exact_mut(GROUP * PANEL))
        {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512F was detected; the slices have the lengths the kernel reads.
                unsafe { x86::decode_group(self.form, scales, codes, out) };
                continue;
            }
            decode_group(self.form, scales, codes, out);
        }
    }
}

/// One group's values, `q * d + m` per element, in plain loops.
fn decode_group(form: Form, scales: &[f32], codes: &[u8], out: &mut [f32]) {
    let (d, m) = scales.split_at(PANEL);
    let mut put = |row: usize, c: usize, q: f32| out[row * PANEL + c] = q * d[c] + m[c];
    for (r, bytes) in codes.chunks_exact(PANEL).enumerate() {
        for (c, &b) in bytes.iter().enumerate() {
            match form {
                Form::Nibbles => {
                    put(2 * r, c, (b & 15) as f32);
                    put(2 * r + 1, c, (b >> 4) as f32);
                }
                Form::Bytes => put(r, c, b as i8 as f32),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Form, GROUP, PANEL};
    use std::arch::x86_64::*;

    /// [`super::decode_group`] sixteen columns at a time.
    ///
    /// # Safety
    /// AVX-512F present; `scales` holds 2 x PANEL values, `codes` the form's code rows of
    /// PANEL bytes, `out` GROUP x PANEL values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn decode_group(form: Form, scales: &[f32], codes: &[u8], out: &mut [f32]) {
        assert!(scales.len() >= 2 * PANEL && out.len() >= GROUP * PANEL);
        assert!(codes.len() >= form.code_rows() * PANEL);
        let (sp, cp, op) = (scales.as_ptr(), codes.as_ptr(), out.as_mut_ptr());
        for v in (0..PANEL).step_by(16) {
            let d = _mm512_loadu_ps(sp.add(v));
            let m = _mm512_loadu_ps(sp.add(PANEL + v));
            let value = |q: __m512i| _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), d), m);
            let bytes = |row: usize| _mm_loadu_si128(cp.add(row * PANEL + v) as *const __m128i);
            match form {
                Form::Nibbles => {
                    for i in 0..GROUP / 2 {
                        let b = _mm512_cvtepu8_epi32(bytes(i));
                        let lo = _mm512_and_si512(b, _mm512_set1_epi32(15));
                        let hi = _mm512_srli_epi32::<4>(b);
                        _mm512_storeu_ps(op.add(2 * i * PANEL + v), value(lo));
                        _mm512_storeu_ps(op.add((2 * i + 1) * PANEL + v), value(hi));
                    }
                }
                Form::Bytes => {
                    for r in 0..GROUP {
                        let q = _mm512_cvtepi8_epi32(bytes(r));
                        _mm512_storeu_ps(op.add(r * PANEL + v), value(q));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::PanelMatrix;

    /// A hash-spread value in [0, 1).
    fn unit(i: usize, salt: u32) -> f32 {
        ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(salt) >> 8) as f32
            / (1u32 << 24) as f32
    }

    /// A (k, n) matrix of smooth values quantised per block of 32 down a column the way
    /// llama.cpp's reference Q4_1 quantiser does (minimum at code 0, maximum at 15, f16 scale
    /// and offset), then dequantised.
    fn like_q4_1(k: usize, n: usize) -> Vec<f32> {
        quantised(k, n, |x| {
            let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (hi - lo) / 15.0;
            let (d16, m16) = (f16::from_f32(d).to_f32(), f16::from_f32(lo).to_f32());
            x.map(|v| ((v - lo) / d + 0.5).floor().min(15.0) * d16 + m16)
        })
    }

    /// As llama.cpp's reference Q8_0 quantiser: largest magnitude at ±127, f16 scale.
    fn like_q8_0(k: usize, n: usize) -> Vec<f32> {
        quantised(k, n, |x| {
            let d = x.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            let d16 = f16::from_f32(d).to_f32();
            // Codes are integers: a code of zero is +0, whatever the value's sign.
            x.map(|v| (v / d).round() as i32 as f32 * d16)
        })
    }

    fn quantised(k: usize, n: usize, block: impl Fn([f32; GROUP]) -> [f32; GROUP]) -> Vec<f32> {
        let mut w = vec![0f32; k * n];
        for j in 0..n {
            for g in 0..k / GROUP {
                let x = std::array::from_fn(|r| unit((j * k + g * GROUP + r) * 3, 1) - 0.4);
                for (r, v) in block(x).into_iter().enumerate() {
                    w[(g * GROUP + r) * n + j] = v;
                }
            }
        }
        w
    }

    fn rows(m: usize, k: usize) -> Vec<f32> {
        (0..m * k).map(|i| unit(i, 9) * 2.0 - 1.0).collect()
    }

    #[test]
    fn quantised_weights_give_the_f32_panel_bits_in_their_narrowest_form() {
        for (k, n, bits) in [(64, 100, 4), (96, 48, 4), (32, 7, 4), (64, 130, 8)] {
            let w = if bits == 4 {
                like_q4_1(k, n)
            } else {
                like_q8_0(k, n)
            };
            let coded = CodedPanels::find(|kk, j| w[kk * n + j], k, n).expect("codes found");
            assert_eq!(coded.code_bits(), bits, "{k}x{n}");
            let dense = PanelMatrix::from_in_out(&w, k, n);
            for m in [1, 3, 16] {
                let x = rows(m, k);
                assert_eq!(coded.matmul(&x, m), dense.matmul(&x, m), "{k}x{n} m={m}");
            }
        }
    }

    #[test]
    fn every_decoder_gives_the_stored_values() {
        let (k, n) = (64, 48);
        for w in [like_q4_1(k, n), like_q8_0(k, n)] {
            let coded = CodedPanels::find(|kk, j| w[kk * n + j], k, n).expect("codes found");
            let mut plain = vec![0f32; k * PANEL];
            let code_len = coded.form.code_rows() * PANEL;
            for g in 0..k / GROUP {
                decode_group(
                    coded.form,
                    &coded.scales[g * 2 * PANEL..][..2 * PANEL],
                    &coded.codes[g * code_len..][..code_len],
                    &mut plain[g * GROUP * PANEL..][..GROUP * PANEL],
                );
            }
            let mut auto = vec![0f32; k * PANEL];
            coded.decode_panel(0, &mut auto);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&plain), bits(&w), "portable decoder");
            assert_eq!(bits(&auto), bits(&w), "detected decoder");
        }
    }

    #[test]
    fn a_weight_with_one_value_off_the_grid_keeps_f32() {
        let (k, n) = (64, 50);
        let mut w = like_q4_1(k, n);
        w[37 * n + 41] += 1e-6;
        assert!(CodedPanels::find(|kk, j| w[kk * n + j], k, n).is_none());
        let smooth = rows(k, n);
        assert!(CodedPanels::find(|kk, j| smooth[kk * n + j], k, n).is_none());
        assert!(
            CodedPanels::find(|kk, j| smooth[kk * n + j], 40, n).is_none(),
            "k not a multiple of the block"
        );
    }
}
