//! Memory budgets of the checkpoint reader: how much it may allocate, derived from the size
//! of what it reads, so that no file can make it allocate more than its size justifies.
//!
//! Two things in a checkpoint can describe far more data than they hold:
//!
//! * the pickle, through shared references: a memoized object is stored once and named by
//!   a 2-byte `BINGET` as often as the writer likes, so anything that copies or walks it
//!   once per reference (a call's argument tuple, a string, the plain-data view of the
//!   extras) multiplies its size. The interpreter and everything built from its result
//!   charge what they allocate against one [`Budget::pickle`] per stage, sized from the
//!   length of `data.pkl`;
//! * tensor views, through strides: a stride-0 (broadcast) or overlapping view of a small
//!   storage names as many elements as its shape says, and a storage can be viewed by any
//!   number of tensors. The tensor reader charges every storage record it reads and every
//!   tensor it gathers against one [`Budget::tensors`], sized from the file.
//!
//! Each limit is far above what a real checkpoint needs (see the constants), and hitting
//! one is an error naming the file and the limit, never a partial result.

/// Bytes of objects that a `data.pkl` of `n` bytes may build, per byte, for each stage
/// (unpickling; then the state dict's keys and the plain-data view of the extras).
///
/// Without shared references a pickle byte builds at most one object (an `EMPTY_TUPLE`
/// or `NONE` opcode is one byte; an object of the interpreter or of [`super::PyValue`]
/// takes 48 to 64 bytes, plus 8 for its slot in a container), so only a file that
/// expands shared references over and over can need more than 96 bytes per byte.
pub(crate) const PICKLE_BYTES_PER_BYTE: u64 = 96;

/// The smallest pickle budget (32 MiB): lets small files share freely. Real checkpoints
/// use a fraction of it: the largest fixture (a MobileNetV3 FasterRCNN with its optimizer
/// state, 100 KB of `data.pkl`) builds 2.6 MB of objects in the interpreter (26 bytes per
/// byte) and 130 KB of keys and extras.
pub(crate) const PICKLE_FLOOR: u64 = 32 << 20;

/// Bytes of tensor data (storage records read plus tensors gathered out of them) on top
/// of twice the file size (64 MiB): room for small broadcast buffers and tied weights.
///
/// Twice the file size covers a checkpoint whose every weight is a non-contiguous view
/// (a `channels_last` model): its records (at most the file) are read and then gathered
/// once more. Contiguous weights, the usual case, take their record without a copy: the
/// fixtures' FasterRCNN checkpoints use 1.0 x their weights' size.
pub(crate) const TENSOR_SLACK: u64 = 64 << 20;

/// A running total of bytes allocated against a limit.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    limit: u64,
    used: u64,
}

/// A charge that did not fit; carries the limit for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverBudget {
    /// The budget's limit in bytes.
    pub limit: u64,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Budget {
        Budget { limit, used: 0 }
    }

    /// The budget of one stage of building objects from a `data.pkl` of `pkl_len` bytes:
    /// `max(PICKLE_FLOOR, PICKLE_BYTES_PER_BYTE * pkl_len)`.
    pub fn pickle(pkl_len: usize) -> Budget {
        Budget::new((pkl_len as u64).saturating_mul(PICKLE_BYTES_PER_BYTE).max(PICKLE_FLOOR))
    }

    /// The budget of the tensor data of a checkpoint file of `file_len` bytes:
    /// `2 * file_len + TENSOR_SLACK`.
    pub fn tensors(file_len: u64) -> Budget {
        Budget::new(file_len.saturating_mul(2).saturating_add(TENSOR_SLACK))
    }

    /// Bytes charged so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Account for `bytes` more, or refuse (leaving the total unchanged) when they do not fit.
    pub fn charge(&mut self, bytes: u64) -> Result<(), OverBudget> {
        match self.used.checked_add(bytes) {
            Some(total) if total <= self.limit => {
                self.used = total;
                Ok(())
            }
            _ => Err(OverBudget { limit: self.limit }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_add_up_and_never_wrap() {
        let mut b = Budget::new(10);
        assert!(b.charge(6).is_ok());
        assert_eq!(b.charge(5), Err(OverBudget { limit: 10 }));
        assert_eq!(b.used(), 6);
        assert!(b.charge(4).is_ok());
        assert!(b.charge(u64::MAX).is_err());
        assert_eq!(Budget::pickle(0).limit, PICKLE_FLOOR);
        assert_eq!(Budget::pickle(1 << 20).limit, 96 << 20);
        assert_eq!(Budget::tensors(u64::MAX).limit, u64::MAX);
    }
}
