//! Serde defaults of the kinds' params structs that are plain numbers, written on the field
//! they belong to: `#[serde(default = "defaults::int::<4>")]`, `"defaults::ratio::<1, 10_000>"`
//! (1e-4). A default becomes part of every stage key through the derived spec, so these must
//! give exactly the values written before: `ratio` divides two exactly representable
//! integers, and IEEE division rounds to the nearest double, the same one the decimal
//! literal parses to.
//!
//! An `Option` param needs no default: serde fills a missing one with `None`, and the derived
//! spec gives it the default `null` either way (the `kind_params` golden pins this), so such
//! fields carry no `#[serde(default)]`.

/// A `usize` param's default.
pub fn int<const N: usize>() -> usize {
    N
}

/// A `u64` param's default.
pub fn uint<const N: u64>() -> u64 {
    N
}

/// An `f64` param's default, `NUM / DEN`.
pub fn ratio<const NUM: u64, const DEN: u64>() -> f64 {
    NUM as f64 / DEN as f64
}

/// A `bool` param that defaults to true.
pub fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn ratios_are_the_decimal_literals() {
        assert_eq!(super::ratio::<1, 10_000>().to_bits(), 1e-4_f64.to_bits());
        assert_eq!(super::ratio::<5, 1_000_000>().to_bits(), 5e-6_f64.to_bits());
        assert_eq!(super::ratio::<8, 10>().to_bits(), 0.8_f64.to_bits());
        assert_eq!(super::ratio::<1, 100>().to_bits(), 0.01_f64.to_bits());
    }
}
