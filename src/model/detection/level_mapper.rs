//! torchvision's `LevelMapper` (torchvision/ops/poolers.py): which FPN level pools each RoI.

use super::DetectionOps;
use crate::model::arch::{LEVEL_MAPPER_CANONICAL_LEVEL, LEVEL_MAPPER_CANONICAL_SCALE, LEVEL_MAPPER_EPS};

/// `LevelMapper.__call__` on RoIs [R, 4]: `floor(lvl0 + log2(sqrt(area) / s0) + eps)`, clamped
/// to [`k_min`, `k_max`], minus `k_min`: the 0-based index of the level each RoI is pooled
/// from, as float32 [R]. `k_min`/`k_max` are `-log2` of the first and last level's scale.
pub fn target_levels<B: DetectionOps>(b: &mut B, rois: &B::Tensor, k_min: &B::Scalar, k_max: &B::Scalar) -> B::Tensor {
    // box_area: (x2 - x1) * (y2 - y1).
    let [x1, y1, x2, y2] = b.coords(rois);
    let widths = b.sub(&x2, &x1);
    let heights = b.sub(&y2, &y1);
    let area = b.mul(&widths, &heights);
    let s = b.sqrt(&area);
    let canonical_scale = b.constant(LEVEL_MAPPER_CANONICAL_SCALE as f64);
    let relative = b.div_scalar(&s, &canonical_scale);
    let log = b.log2(&relative);
    let canonical_level = b.constant(LEVEL_MAPPER_CANONICAL_LEVEL as f64);
    let level = b.add_scalar(&log, &canonical_level);
    let eps = b.constant(f64::from(LEVEL_MAPPER_EPS));
    let level = b.add_scalar(&level, &eps);
    let level = b.floor(&level);
    let level = b.clamp(&level, Some(k_min), Some(k_max));
    b.sub_scalar(&level, k_min)
}
