//! Box utilities of torchvision: `clip_boxes_to_image`, `remove_small_boxes`
//! (torchvision/ops/boxes.py) and `resize_boxes` (torchvision/models/detection/transform.py).

use super::{DetectionOps, ImageSize};

/// `clip_boxes_to_image(boxes, (height, width))`: each coordinate clamped to [0, side].
/// Returns the four clipped coordinates (callers stack them or test them).
pub fn clip_to_image<B: DetectionOps>(b: &mut B, boxes: &B::Tensor, size: &ImageSize<B::Scalar>) -> [B::Tensor; 4] {
    let zero = b.constant(0.0);
    let [x1, y1, x2, y2] = b.coords(boxes);
    [
        b.clamp(&x1, Some(&zero), Some(&size.width)),
        b.clamp(&y1, Some(&zero), Some(&size.height)),
        b.clamp(&x2, Some(&zero), Some(&size.width)),
        b.clamp(&y2, Some(&zero), Some(&size.height)),
    ]
}

/// `remove_small_boxes(boxes, min_size)` as a mask: width and height both `>= min_size`.
pub fn big_enough<B: DetectionOps>(b: &mut B, coords: &[B::Tensor; 4], min_size: f64) -> B::Tensor {
    let min_size = b.constant(min_size);
    let widths = b.sub(&coords[2], &coords[0]);
    let heights = b.sub(&coords[3], &coords[1]);
    let wide = b.at_least(&widths, &min_size);
    let tall = b.at_least(&heights, &min_size);
    b.both(&wide, &tall)
}

/// `resize_boxes(boxes, resized, original)` (`GeneralizedRCNNTransform.postprocess`): each
/// coordinate times original / resized along its axis, the ratios in float32.
pub fn resize_to_original<B: DetectionOps>(
    b: &mut B,
    coords: &[B::Tensor; 4],
    resized: &ImageSize<B::Scalar>,
    original: &ImageSize<B::Scalar>,
) -> [B::Tensor; 4] {
    let ratio_h = b.ratio(&original.height, &resized.height);
    let ratio_w = b.ratio(&original.width, &resized.width);
    [
        b.mul_scalar(&coords[0], &ratio_w),
        b.mul_scalar(&coords[1], &ratio_h),
        b.mul_scalar(&coords[2], &ratio_w),
        b.mul_scalar(&coords[3], &ratio_h),
    ]
}
