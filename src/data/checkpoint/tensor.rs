//! Dense tensors read from a checkpoint, and the strided-view gather that produces them.

use std::fmt;

/// Element type of a tensor, named as torch names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `torch.float64`
    F64,
    /// `torch.float32`
    F32,
    /// `torch.float16`
    F16,
    /// `torch.bfloat16`
    BF16,
    /// `torch.int64`
    I64,
    /// `torch.int32`
    I32,
    /// `torch.int16`
    I16,
    /// `torch.int8`
    I8,
    /// `torch.uint8`
    U8,
    /// `torch.uint16`
    U16,
    /// `torch.uint32`
    U32,
    /// `torch.uint64`
    U64,
    /// `torch.bool` (one byte per element, 0 or 1)
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// torch's name without the `torch.` prefix (`float32`, `bfloat16`, `bool`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::Bool => "bool",
        }
    }

    /// The dtype of a legacy typed storage class (`FloatStorage`), as torch's
    /// `_dtype_to_storage_type_map` pairs them; `UntypedStorage` holds bytes.
    pub(crate) fn from_storage_class(class: &str) -> Option<DType> {
        Some(match class {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" | "UntypedStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }

    /// The dtype named by a `torch.<name>` global (`torch.float32`, `torch.half`, ...).
    pub(crate) fn from_torch_name(name: &str) -> Option<DType> {
        Some(match name {
            "float64" | "double" => DType::F64,
            "float32" | "float" => DType::F32,
            "float16" | "half" => DType::F16,
            "bfloat16" => DType::BF16,
            "int64" | "long" => DType::I64,
            "int32" | "int" => DType::I32,
            "int16" | "short" => DType::I16,
            "int8" => DType::I8,
            "uint8" => DType::U8,
            "uint16" => DType::U16,
            "uint32" => DType::U32,
            "uint64" => DType::U64,
            "bool" => DType::Bool,
            _ => return None,
        })
    }

    /// Whether the dtype is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dense, contiguous, row-major tensor with little-endian element bytes.
///
/// Invariant: `data().len() == numel() * dtype().size()`.
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Data,
}

/// A tensor's elements: little-endian bytes, or float32 values read straight from a
/// little-endian archive on a little-endian machine (the usual checkpoint), which become
/// model weights without another copy.
#[derive(Clone)]
enum Data {
    Bytes(Vec<u8>),
    F32(Vec<f32>),
}

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Bytes(b) => b,
            // Native order, which is little-endian wherever this variant is built.
            Data::F32(v) => bytemuck::cast_slice(v),
        }
    }
}

impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        self.dtype == other.dtype && self.shape == other.shape && self.data.bytes() == other.data.bytes()
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes would drown everything else; dtype and shape identify a tensor.
        f.debug_struct("Tensor").field("dtype", &self.dtype).field("shape", &self.shape).finish_non_exhaustive()
    }
}

impl Tensor {
    /// A tensor from its parts; `None` when `data` is not `numel * dtype.size()` bytes.
    pub fn from_parts(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Option<Tensor> {
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        if numel.checked_mul(dtype.size())? != data.len() {
            return None;
        }
        Some(Tensor { dtype, shape, data: Data::Bytes(data) })
    }

    /// A float32 tensor that takes `values` as they are (little-endian machines only);
    /// `None` when their count does not match `shape`.
    pub(crate) fn from_f32_values(shape: Vec<usize>, values: Vec<f32>) -> Option<Tensor> {
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        (cfg!(target_endian = "little") && numel == values.len()).then_some(Tensor { dtype: DType::F32, shape, data: Data::F32(values) })
    }

    /// A float32 tensor; `None` when `values.len()` does not match `shape`.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Option<Tensor> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_parts(DType::F32, shape, data)
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dimensions, outermost first (empty for a 0-d scalar).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements (1 for a 0-d scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw little-endian element bytes, row-major.
    pub fn data(&self) -> &[u8] {
        self.data.bytes()
    }

    /// The raw bytes, consuming the tensor.
    pub fn into_data(self) -> Vec<u8> {
        match self.data {
            Data::Bytes(b) => b,
            Data::F32(v) => bytemuck::cast_slice(&v).to_vec(),
        }
    }

    /// The values as f32, consuming the tensor: float32 read straight from the archive is
    /// handed over without a copy; other types convert as [`Tensor::to_f32`].
    pub fn into_f32(self) -> Vec<f32> {
        match self.data {
            Data::F32(v) => v,
            Data::Bytes(_) => self.to_f32(),
        }
    }

    /// The values as f32. f64, int64 and the other wide integer types round to nearest;
    /// f16 and bf16 widen exactly; bool is 0.0 or 1.0.
    pub fn to_f32(&self) -> Vec<f32> {
        if let Data::F32(v) = &self.data {
            return v.clone();
        }
        let d = self.data.bytes();
        match self.dtype {
            DType::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => self.to_f64().into_iter().map(|v| v as f32).collect(),
        }
    }

    /// The values as f64 (exact except for 64-bit integers beyond 2^53).
    pub fn to_f64(&self) -> Vec<f64> {
        let d = self.data.bytes();
        match self.dtype {
            DType::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(le8(c))).collect(),
            DType::F32 | DType::F16 | DType::BF16 => self.to_f32().into_iter().map(f64::from).collect(),
            DType::U64 => d.chunks_exact(8).map(|c| u64::from_le_bytes(le8(c)) as f64).collect(),
            _ => match self.to_i64() {
                Some(v) => v.into_iter().map(|x| x as f64).collect(),
                None => Vec::new(),
            },
        }
    }

    /// The values as i64 for integer and bool tensors (uint64 values above `i64::MAX`
    /// wrap); `None` for floating-point tensors.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let d = self.data.bytes();
        Some(match self.dtype {
            DType::I64 | DType::U64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(le8(c))).collect(),
            DType::I32 => d.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
            DType::U32 => d.chunks_exact(4).map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
            DType::I16 => d.chunks_exact(2).map(|c| i64::from(i16::from_le_bytes([c[0], c[1]]))).collect(),
            DType::U16 => d.chunks_exact(2).map(|c| i64::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
            DType::I8 => d.iter().map(|&b| i64::from(b as i8)).collect(),
            DType::U8 | DType::Bool => d.iter().map(|&b| i64::from(b)).collect(),
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 => return None,
        })
    }
}

fn le8(c: &[u8]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(c);
    b
}

/// A validated strided view: sizes, strides and offset in elements.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct View {
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
    pub offset: usize,
    pub numel: usize,
    /// One past the largest element index the view touches (0 when it is empty).
    pub extent: usize,
}

impl View {
    /// Check torch's `(offset, size, stride)` and compute the view's reach; the error says
    /// what is wrong.
    pub fn new(offset: i64, shape: &[i64], stride: &[i64]) -> Result<View, String> {
        if shape.len() != stride.len() {
            return Err(format!("size has {} dims but stride has {}", shape.len(), stride.len()));
        }
        let to_usize = |v: i64, what: &str| usize::try_from(v).map_err(|_| format!("negative {what} {v}"));
        let offset = to_usize(offset, "storage offset")?;
        let shape = shape.iter().map(|&s| to_usize(s, "size")).collect::<Result<Vec<_>, _>>()?;
        let stride = stride.iter().map(|&s| to_usize(s, "stride")).collect::<Result<Vec<_>, _>>()?;
        let overflow = || format!("size {shape:?} with stride {stride:?} overflows");
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(overflow)?;
        let extent = if numel == 0 {
            0
        } else {
            let last = shape
                .iter()
                .zip(&stride)
                .try_fold(offset, |acc, (&d, &s)| acc.checked_add((d - 1).checked_mul(s)?))
                .ok_or_else(overflow)?;
            last.checked_add(1).ok_or_else(overflow)?
        };
        Ok(View { shape, stride, offset, numel, extent })
    }

    /// Whether the view is one row-major run of elements starting at `offset`.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }

    /// Copy the viewed elements, row-major, out of `storage`.
    ///
    /// The caller has checked `extent * elem <= storage.len()`.
    pub fn gather(&self, storage: &[u8], elem: usize) -> Vec<u8> {
        let total = self.numel * elem;
        if self.numel == 0 {
            return Vec::new();
        }
        if self.is_contiguous() {
            let start = self.offset * elem;
            return storage[start..start + total].to_vec();
        }
        let mut out = Vec::with_capacity(total);
        let ndim = self.shape.len();
        // Iterate over all but the innermost dim; copy the innermost as a run when it is
        // dense (a transposed or sliced matrix), element by element otherwise.
        let inner = self.shape[ndim - 1];
        let inner_stride = self.stride[ndim - 1];
        let outer = &self.shape[..ndim - 1];
        let mut index = vec![0usize; outer.len()];
        let mut base = self.offset;
        loop {
            if inner_stride == 1 {
                out.extend_from_slice(&storage[base * elem..(base + inner) * elem]);
            } else {
                for i in 0..inner {
                    let at = (base + i * inner_stride) * elem;
                    out.extend_from_slice(&storage[at..at + elem]);
                }
            }
            // Odometer increment of the outer index, keeping `base` in step.
            let mut dim = outer.len();
            loop {
                if dim == 0 {
                    return out;
                }
                dim -= 1;
                index[dim] += 1;
                base += self.stride[dim];
                if index[dim] < outer[dim] {
                    break;
                }
                base -= self.stride[dim] * outer[dim];
                index[dim] = 0;
            }
        }
    }
}

/// Reverse the bytes of every `elem`-byte element (big-endian checkpoint to little-endian).
pub(crate) fn swap_bytes(data: &mut [u8], elem: usize) {
    if elem > 1 {
        for chunk in data.chunks_exact_mut(elem) {
            chunk.reverse();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_storage(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    fn gather_f32(storage: &[u8], offset: i64, shape: &[i64], stride: &[i64]) -> Vec<f32> {
        let view = View::new(offset, shape, stride).unwrap();
        assert!(view.extent * 4 <= storage.len());
        let t = Tensor::from_parts(DType::F32, view.shape.clone(), view.gather(storage, 4)).unwrap();
        t.to_f32()
    }

    #[test]
    fn transpose_slice_and_broadcast() {
        let s = f32_storage(12); // a 3x4 matrix 0..12
        assert_eq!(gather_f32(&s, 0, &[4, 3], &[1, 4]), [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
        assert_eq!(gather_f32(&s, 4, &[2, 4], &[4, 1]), [4., 5., 6., 7., 8., 9., 10., 11.]);
        assert_eq!(gather_f32(&s, 1, &[3, 2], &[4, 2]), [1., 3., 5., 7., 9., 11.]);
        assert_eq!(gather_f32(&s, 2, &[2, 3], &[0, 1]), [2., 3., 4., 2., 3., 4.]);
        assert_eq!(gather_f32(&s, 7, &[], &[]), [7.]);
        assert_eq!(gather_f32(&s, 0, &[2, 2, 3], &[1, 6, 2]), [0., 2., 4., 6., 8., 10., 1., 3., 5., 7., 9., 11.]);
    }

    #[test]
    fn view_validation() {
        assert_eq!(View::new(0, &[0, 5], &[5, 1]).unwrap().extent, 0);
        assert_eq!(View::new(3, &[2, 2], &[2, 1]).unwrap().extent, 7);
        assert!(View::new(-1, &[2], &[1]).is_err());
        assert!(View::new(0, &[-2], &[1]).is_err());
        assert!(View::new(0, &[2], &[-1]).is_err());
        assert!(View::new(0, &[i64::MAX, i64::MAX], &[1, 1]).is_err());
        assert!(View::new(0, &[4, i64::MAX], &[i64::MAX, 1]).is_err());
        assert!(View::new(0, &[3, 2], &[i64::MAX, 1]).is_err());
    }

    #[test]
    fn conversions() {
        let bf = Tensor::from_parts(DType::BF16, vec![2], vec![0x80, 0x3f, 0x60, 0xc0]).unwrap();
        assert_eq!(bf.to_f32(), [1.0, -3.5]);
        let h = Tensor::from_parts(DType::F16, vec![1], half::f16::from_f32(0.5).to_le_bytes().to_vec()).unwrap();
        assert_eq!(h.to_f32(), [0.5]);
        let i = Tensor::from_parts(DType::I8, vec![2], vec![0xff, 0x7f]).unwrap();
        assert_eq!(i.to_i64().unwrap(), [-1, 127]);
        assert_eq!(i.to_f32(), [-1.0, 127.0]);
        assert!(Tensor::from_parts(DType::F32, vec![3], vec![0; 8]).is_none());
        assert_eq!(Tensor::from_f32(vec![], &[2.0]).unwrap().numel(), 1);
        let mut d = vec![1, 2, 3, 4];
        swap_bytes(&mut d, 2);
        assert_eq!(d, [2, 1, 4, 3]);
    }
}
