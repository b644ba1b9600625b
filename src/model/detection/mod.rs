//! torchvision's detection logic around the network, written once.
//!
//! [`network`](super::network) describes the layers once; this module does the same for the
//! formulas between them, over [`DetectionOps`]: box decoding ([`box_coder`]), clipping,
//! small-box removal and the rescale to the original image ([`boxes`]), the RoI level mapper
//! ([`level_mapper`]) and the resize size ([`resize`]); and for the pipeline that ties layers
//! and formulas together ([`pipeline`], over [`pipeline::PipelineOps`]). The ONNX writer
//! (`onnx::export::OnnxBackend`) implements the ops as graph nodes, the libtorch runner
//! (`mkonnx_torch::TchBackend`) as the ATen calls eager torchvision makes, so one description
//! gives both the graph and the bit-exact runner.
//!
//! Each function names the torchvision code it mirrors and keeps its operation order: in
//! float32, `(a - b) * c` and `a * c - b * c` differ in the last bit, and the runner must equal
//! eager PyTorch bit for bit. Backends implement each op with the same arithmetic as
//! torchvision's (for instance a scalar multiplier is rounded to float32 first, as ATen does).
//! See docs/ARCHITECTURE.md section 9 for where each torchvision behaviour lives.

pub mod box_coder;
pub mod boxes;
pub mod level_mapper;
pub mod pipeline;
pub mod resize;

use super::network::Backend;

/// The tensor operations of the detection formulas, on top of the layers' [`Backend`]
/// (whose `mul` is the elementwise product used here too). Operations are elementwise and
/// broadcast; boxes are tensors whose last axis holds (x1, y1, x2, y2).
pub trait DetectionOps: Backend {
    /// A scalar that the formulas combine with tensors: an image side, a level bound, a
    /// ratio. A graph value in ONNX (it depends on the input's shape), a number on libtorch
    /// (known when the op runs). Always used as float32.
    type Scalar: Clone;

    /// The constant `v` (used as float32, as torchvision's Python numbers are).
    fn constant(&mut self, v: f64) -> Self::Scalar;
    /// `a / b` in float32, as `torch.tensor(a, dtype=float32) / torch.tensor(b, ...)`.
    fn ratio(&mut self, a: &Self::Scalar, b: &Self::Scalar) -> Self::Scalar;

    /// The four coordinates of `boxes` [..., 4]: each [...].
    fn coords(&mut self, boxes: &Self::Tensor) -> [Self::Tensor; 4];
    /// Stacks four coordinate tensors [...] into boxes [..., 4].
    fn stack_coords(&mut self, coords: &[Self::Tensor; 4]) -> Self::Tensor;

    /// `a + b` (a new tensor; unlike [`Backend::add`], never in place).
    fn plus(&mut self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// `a - b`.
    fn sub(&mut self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// `x + s`.
    fn add_scalar(&mut self, x: &Self::Tensor, s: &Self::Scalar) -> Self::Tensor;
    /// `x - s`.
    fn sub_scalar(&mut self, x: &Self::Tensor, s: &Self::Scalar) -> Self::Tensor;
    /// `x * s`.
    fn mul_scalar(&mut self, x: &Self::Tensor, s: &Self::Scalar) -> Self::Tensor;
    /// `x / s`.
    fn div_scalar(&mut self, x: &Self::Tensor, s: &Self::Scalar) -> Self::Tensor;
    /// `x.clamp(min=lo, max=hi)` (NaN stays NaN).
    fn clamp(&mut self, x: &Self::Tensor, lo: Option<&Self::Scalar>, hi: Option<&Self::Scalar>) -> Self::Tensor;
    /// `torch.exp`.
    fn exp(&mut self, x: &Self::Tensor) -> Self::Tensor;
    /// `torch.sqrt`.
    fn sqrt(&mut self, x: &Self::Tensor) -> Self::Tensor;
    /// `torch.log2`.
    fn log2(&mut self, x: &Self::Tensor) -> Self::Tensor;
    /// `torch.floor`.
    fn floor(&mut self, x: &Self::Tensor) -> Self::Tensor;
    /// The boolean mask `x >= s`.
    fn at_least(&mut self, x: &Self::Tensor, s: &Self::Scalar) -> Self::Tensor;
    /// The boolean mask `a & b`.
    fn both(&mut self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
}

/// An image size (height, width) as scalars of a backend.
pub struct ImageSize<S> {
    /// Height in pixels.
    pub height: S,
    /// Width in pixels.
    pub width: S,
}
