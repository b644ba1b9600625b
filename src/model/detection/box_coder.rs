//! torchvision's `BoxCoder.decode_single` (torchvision/models/detection/_utils.py).

use super::DetectionOps;
use crate::model::arch::BBOX_XFORM_CLIP;

/// `BoxCoder(weights).decode_single`: applies `deltas` [..., 4] (dx, dy, dw, dh) to the
/// reference boxes `reference` [..., 4] (broadcast against `deltas`), returning boxes
/// [..., 4]. Width and height deltas are clamped at `BBOX_XFORM_CLIP` before `exp`.
///
/// The RPN decodes with weights (1, 1, 1, 1), the box head with `ROI_BOX_CODER_WEIGHTS`.
pub fn decode<B: DetectionOps>(b: &mut B, deltas: &B::Tensor, reference: &B::Tensor, weights: [f64; 4]) -> B::Tensor {
    let half = b.constant(0.5);
    let [x1, y1, x2, y2] = b.coords(reference);
    let widths = b.sub(&x2, &x1);
    let heights = b.sub(&y2, &y1);
    let half_w = b.mul_scalar(&widths, &half);
    let ctr_x = b.plus(&x1, &half_w);
    let half_h = b.mul_scalar(&heights, &half);
    let ctr_y = b.plus(&y1, &half_h);

    let [dx, dy, dw, dh] = b.coords(deltas);
    let [wx, wy, ww, wh] = weights.map(|w| b.constant(w));
    let dx = b.div_scalar(&dx, &wx);
    let dy = b.div_scalar(&dy, &wy);
    let dw = b.div_scalar(&dw, &ww);
    let dh = b.div_scalar(&dh, &wh);
    // Prevent sending too large values into torch.exp().
    let clip = b.constant(BBOX_XFORM_CLIP);
    let dw = b.clamp(&dw, None, Some(&clip));
    let dh = b.clamp(&dh, None, Some(&clip));

    let moved_x = b.mul(&dx, &widths);
    let pred_ctr_x = b.plus(&moved_x, &ctr_x);
    let moved_y = b.mul(&dy, &heights);
    let pred_ctr_y = b.plus(&moved_y, &ctr_y);
    let scale_w = b.exp(&dw);
    let pred_w = b.mul(&scale_w, &widths);
    let scale_h = b.exp(&dh);
    let pred_h = b.mul(&scale_h, &heights);

    // Distance from the centre to a corner: torch.tensor(0.5) * pred_w.
    let c_to_c_w = b.mul_scalar(&pred_w, &half);
    let c_to_c_h = b.mul_scalar(&pred_h, &half);
    let corners =
        [b.sub(&pred_ctr_x, &c_to_c_w), b.sub(&pred_ctr_y, &c_to_c_h), b.plus(&pred_ctr_x, &c_to_c_w), b.plus(&pred_ctr_y, &c_to_c_h)];
    b.stack_coords(&corners)
}
