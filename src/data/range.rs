//! The values a number read from a config or a dataset may take. Every number mkonnx reads
//! from a user's file is checked against one of these where it enters, so that a NaN, an
//! infinity, a negative count or an integer too large for its type is an error naming the
//! file, the key and the range instead of a silent wrap or a failure stages later.

/// An interval of finite numbers, optionally integers only.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Range {
    min: f64,
    /// Whether `min` itself is excluded (`image_std` must be > 0, not >= 0).
    min_exclusive: bool,
    max: f64,
    integer: bool,
}

impl Range {
    /// Integers in `[min, max]`. Both bounds must be below 2^53, where every integer is an
    /// `f64` (the checked value is read as one).
    pub const fn integer(min: u64, max: u64) -> Range {
        Range { min: min as f64, min_exclusive: false, max: max as f64, integer: true }
    }

    /// Numbers in `[min, max]`.
    pub const fn closed(min: f64, max: f64) -> Range {
        Range { min, min_exclusive: false, max, integer: false }
    }

    /// Numbers in `(0, max]`.
    pub const fn positive(max: f64) -> Range {
        Range { min: 0.0, min_exclusive: true, max, integer: false }
    }

    /// Whether `x` is in the range (never for NaN or an infinity: the bounds are finite).
    pub fn contains(&self, x: f64) -> bool {
        let above_min = if self.min_exclusive { x > self.min } else { x >= self.min };
        above_min && x <= self.max && (!self.integer || x.fract() == 0.0)
    }
}

impl std::fmt::Display for Range {
    /// As error messages say it: "an integer in [1, 10000]", "a number in (0, 1000000]".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.integer { "an integer" } else { "a number" };
        let open = if self.min_exclusive { '(' } else { '[' };
        write!(f, "{kind} in {open}{}, {}]", self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_integers_and_non_finite_values() {
        let sizes = Range::integer(1, 10_000);
        assert!(sizes.contains(1.0) && sizes.contains(320.0) && sizes.contains(10_000.0));
        for x in [0.0, -1.0, 10_001.0, 4_294_967_616.0, 320.5, f64::NAN, f64::INFINITY] {
            assert!(!sizes.contains(x), "{x}");
        }
        let std = Range::positive(1e6);
        assert!(std.contains(1e-9) && !std.contains(0.0) && !std.contains(-0.0) && !std.contains(f64::NAN));
        let unit = Range::closed(0.0, 1.0);
        assert!(unit.contains(0.0) && unit.contains(1.0) && !unit.contains(-1.0) && !unit.contains(2.0));
        assert!(!unit.contains(f64::NEG_INFINITY) && !unit.contains(f64::NAN));
    }

    #[test]
    fn says_itself_as_messages_do() {
        assert_eq!(Range::integer(1, 10_000).to_string(), "an integer in [1, 10000]");
        assert_eq!(Range::closed(0.0, 1.0).to_string(), "a number in [0, 1]");
        assert_eq!(Range::positive(1e6).to_string(), "a number in (0, 1000000]");
    }
}
