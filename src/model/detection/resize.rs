//! The size `GeneralizedRCNNTransform.resize` gives an image (torchvision/models/detection/
//! transform.py, `_resize_image_and_masks`).

/// The resized (unpadded) `[height, width]` of an `h` x `w` image: `scale = min(min_size /
/// min(h, w), max_size / max(h, w))` in Python doubles, then `int(side * scale)` per side
/// (truncation: `F.interpolate(..., scale_factor=scale, recompute_scale_factor=True)`).
///
/// This is the definition. The libtorch runner uses it as is; the ONNX graph computes the same
/// numbers in exact integer arithmetic (`onnx::export::eager_resize_hw`, tested against this
/// function), because runtimes do not all run float64 shape arithmetic faithfully.
pub fn resized_size(h: i64, w: i64, min_size: u32, max_size: u32) -> [i64; 2] {
    let (short, long) = (h.min(w) as f64, h.max(w) as f64);
    let scale = f64::min(f64::from(min_size) / short, f64::from(max_size) / long);
    [(h as f64 * scale) as i64, (w as f64 * scale) as i64]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_eager_where_float32_differs() {
        // Sizes F.interpolate gives in eager PyTorch; float32 arithmetic gives 800 and 799.
        assert_eq!(resized_size(161, 200, 800, 1333), [799, 993]);
        assert_eq!(resized_size(171, 200, 800, 1333), [800, 935]);
        assert_eq!(resized_size(200, 320, 800, 1333), [800, 1280]);
        assert_eq!(resized_size(480, 640, 320, 640), [320, 426]);
    }
}
