//! torchvision's FasterRCNN constructors and their inference hyperparameters.

use crate::data::range::Range;
use serde::{Deserialize, Serialize};

/// The four torchvision FasterRCNN constructors mkonnx converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Architecture {
    /// `fasterrcnn_resnet50_fpn`: ResNet-50 + FPN, TwoMLPHead box head.
    ResNet50Fpn,
    /// `fasterrcnn_resnet50_fpn_v2`: ResNet-50 + FPN with BatchNorm, 2-conv RPN head, conv box head.
    ResNet50FpnV2,
    /// `fasterrcnn_mobilenet_v3_large_fpn`: MobileNetV3-Large + 2-level FPN, 800/1333 px.
    MobileNetV3LargeFpn,
    /// `fasterrcnn_mobilenet_v3_large_320_fpn`: the same network at 320/640 px with fewer proposals.
    MobileNetV3Large320Fpn,
}

impl Architecture {
    /// Every architecture, in a fixed order.
    pub const ALL: [Architecture; 4] =
        [Architecture::ResNet50Fpn, Architecture::ResNet50FpnV2, Architecture::MobileNetV3LargeFpn, Architecture::MobileNetV3Large320Fpn];

    /// torchvision's constructor name.
    pub fn constructor(self) -> &'static str {
        match self {
            Architecture::ResNet50Fpn => "fasterrcnn_resnet50_fpn",
            Architecture::ResNet50FpnV2 => "fasterrcnn_resnet50_fpn_v2",
            Architecture::MobileNetV3LargeFpn => "fasterrcnn_mobilenet_v3_large_fpn",
            Architecture::MobileNetV3Large320Fpn => "fasterrcnn_mobilenet_v3_large_320_fpn",
        }
    }

    /// Parses a constructor name, also as a dotted `_target_` path
    /// (`torchvision.models.detection.fasterrcnn_resnet50_fpn`).
    pub fn from_name(name: &str) -> Option<Architecture> {
        let last = name.trim().rsplit('.').next().unwrap_or(name);
        Architecture::ALL.into_iter().find(|a| a.constructor() == last)
    }

    /// Whether the backbone is ResNet-50 (else MobileNetV3-Large).
    pub fn is_resnet(self) -> bool {
        matches!(self, Architecture::ResNet50Fpn | Architecture::ResNet50FpnV2)
    }

    /// torchvision's inference defaults for this constructor (FasterRCNN's own defaults,
    /// overridden by the constructor's `defaults` dict), before user keyword overrides.
    pub fn defaults(self, num_classes: usize) -> DetectorParams {
        let mut p = DetectorParams {
            num_classes,
            min_size: 800,
            max_size: 1333,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
            rpn_pre_nms_top_n_test: 1000,
            rpn_post_nms_top_n_test: 1000,
            rpn_nms_thresh: 0.7,
            rpn_score_thresh: 0.0,
            box_score_thresh: 0.05,
            box_nms_thresh: 0.5,
            box_detections_per_img: 100,
        };
        match self {
            Architecture::ResNet50Fpn | Architecture::ResNet50FpnV2 => {}
            Architecture::MobileNetV3LargeFpn => p.rpn_score_thresh = 0.05,
            Architecture::MobileNetV3Large320Fpn => {
                p.min_size = 320;
                p.max_size = 640;
                p.rpn_pre_nms_top_n_test = 150;
                p.rpn_post_nms_top_n_test = 150;
                p.rpn_score_thresh = 0.05;
            }
        }
        p
    }

    /// Anchor sizes per feature level, as the constructor builds its AnchorGenerator.
    pub fn anchor_sizes(self) -> Vec<Vec<f32>> {
        if self.is_resnet() {
            [32.0, 64.0, 128.0, 256.0, 512.0].iter().map(|&s| vec![s]).collect()
        } else {
            vec![vec![32.0, 64.0, 128.0, 256.0, 512.0]; 3]
        }
    }

    /// Anchor aspect ratios (h / w) per feature level.
    pub fn aspect_ratios(self) -> Vec<Vec<f32>> {
        vec![vec![0.5, 1.0, 2.0]; self.anchor_sizes().len()]
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.constructor())
    }
}

/// The inference hyperparameters of a FasterRCNN, named as torchvision's keyword arguments.
/// Training-only arguments (samplers, fg/bg thresholds, `*_train` counts) do not appear: they
/// change nothing at inference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectorParams {
    /// Number of classes including background.
    pub num_classes: usize,
    /// Target size of the shorter image side (`min_size`, its last value when a list).
    pub min_size: u32,
    /// Cap on the longer image side.
    pub max_size: u32,
    /// Per-channel normalization mean.
    pub image_mean: [f32; 3],
    /// Per-channel normalization std.
    pub image_std: [f32; 3],
    /// Proposals kept per feature level before the RPN's NMS.
    pub rpn_pre_nms_top_n_test: usize,
    /// Proposals kept per image after the RPN's NMS.
    pub rpn_post_nms_top_n_test: usize,
    /// IoU threshold of the RPN's NMS.
    pub rpn_nms_thresh: f32,
    /// Minimum objectness probability of a proposal (kept when >=).
    pub rpn_score_thresh: f32,
    /// Minimum class score of a detection (kept when >).
    pub box_score_thresh: f32,
    /// IoU threshold of the per-class NMS.
    pub box_nms_thresh: f32,
    /// Maximum detections per image.
    pub box_detections_per_img: usize,
}

/// Allowed `min_size` and `max_size` (every element of a `min_size` list): image sides in
/// pixels, positive as torchvision's resize needs; the bound is above any side an image
/// under the decoders' pixel limit is resized to, and catches values that used to wrap
/// (4294967616 read as 320).
pub const SIZE_RANGE: Range = Range::integer(1, 10_000);
/// Allowed counts: `num_classes`, `rpn_pre_nms_top_n_test`, `rpn_post_nms_top_n_test`,
/// `box_detections_per_img`. At least 1 (0 keeps nothing and makes shapes ONNX Runtime
/// rejects); the bound is far above the ~300k anchors of a 1333 px image.
pub const COUNT_RANGE: Range = Range::integer(1, 1_000_000);
/// Allowed score and IoU thresholds (`rpn_nms_thresh`, `rpn_score_thresh`,
/// `box_score_thresh`, `box_nms_thresh`): scores are probabilities and IoUs lie in [0, 1],
/// where every value has a meaning.
pub const THRESHOLD_RANGE: Range = Range::closed(0.0, 1.0);
/// Allowed `image_mean` entries: images are in 0..1 (0..255 style means are in range too);
/// the bound keeps the normalization finite in float32.
pub const MEAN_RANGE: Range = Range::closed(-1e6, 1e6);
/// Allowed `image_std` entries: the normalization divides by them, so each must be > 0 (a
/// zero made every pixel infinite: no detections, and parity "OK" on both sides).
pub const STD_RANGE: Range = Range::positive(1e6);

/// torchvision's BoxCoder clamp on dw/dh: `math.log(1000.0 / 16)`.
pub const BBOX_XFORM_CLIP: f64 = 4.135166556742356;
/// torchvision.ops.poolers.LevelMapper's canonical box size `s0`: a 224-px box maps to the
/// canonical level.
pub const LEVEL_MAPPER_CANONICAL_SCALE: i64 = 224;
/// torchvision.ops.poolers.LevelMapper's canonical level `lvl0`.
pub const LEVEL_MAPPER_CANONICAL_LEVEL: i64 = 4;
/// torchvision.ops.poolers.LevelMapper's `eps`, added before the floor:
/// `floor(lvl0 + log2(sqrt(area) / s0) + eps)`.
pub const LEVEL_MAPPER_EPS: f32 = 1e-6;
/// torchvision.ops.boxes.batched_nms: above this many box coordinates (`boxes.numel()`) on
/// the CPU it loops NMS over the categories; at or below it, one NMS over boxes offset per
/// category (the "coordinate trick"). The two can keep different boxes in near-ties.
pub const BATCHED_NMS_TRICK_MAX_NUMEL_CPU: usize = 4000;
/// The same switch on CUDA.
pub const BATCHED_NMS_TRICK_MAX_NUMEL_CUDA: usize = 100_000;

/// The most candidates `batched_nms` suppresses with the coordinate trick: `boxes.numel() <=`
/// [`BATCHED_NMS_TRICK_MAX_NUMEL_CPU`] (or `_CUDA`), four numbers a box. The one place the
/// switch is decided, for the runner's NMS and the ONNX graph's.
pub const fn batched_nms_trick_max_candidates(on_cuda: bool) -> usize {
    (if on_cuda { BATCHED_NMS_TRICK_MAX_NUMEL_CUDA } else { BATCHED_NMS_TRICK_MAX_NUMEL_CPU }) / 4
}
/// `RegionProposalNetwork.min_size`: proposals narrower than this are dropped.
pub const RPN_MIN_BOX_SIZE: f32 = 1e-3;
/// `RoIHeads.postprocess_detections`: detections narrower than this are dropped.
pub const DETECTION_MIN_BOX_SIZE: f32 = 1e-2;
/// `GeneralizedRCNNTransform(size_divisible=32)`: `batch_images` zero-pads each batch to
/// multiples of this (height and width).
pub const SIZE_DIVISIBLE: i64 = 32;
/// BatchNorm epsilon of every norm layer in the four detectors (BatchNorm2d and FrozenBatchNorm2d).
pub const BATCH_NORM_EPS: f32 = 1e-5;
/// RoIAlign output size and sampling ratio of MultiScaleRoIAlign.
pub const ROI_OUTPUT_SIZE: i64 = 7;
/// RoIAlign sampling ratio.
pub const ROI_SAMPLING_RATIO: i64 = 2;
/// Box-coder weights of the detection head (the RPN's are all 1).
pub const ROI_BOX_CODER_WEIGHTS: [f32; 4] = [10.0, 10.0, 5.0, 5.0];
/// Feature maps MultiScaleRoIAlign pools from (others, like `pool`, feed only the RPN).
pub const ROI_FEATURE_NAMES: [&str; 4] = ["0", "1", "2", "3"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_accept_target_paths() {
        for a in Architecture::ALL {
            assert_eq!(Architecture::from_name(a.constructor()), Some(a));
        }
        assert_eq!(Architecture::from_name("torchvision.models.detection.fasterrcnn_resnet50_fpn_v2"), Some(Architecture::ResNet50FpnV2));
        assert_eq!(Architecture::from_name("retinanet_resnet50_fpn"), None);
    }

    #[test]
    fn bbox_clip_is_torchvisions() {
        assert_eq!(BBOX_XFORM_CLIP, (1000.0f64 / 16.0).ln());
    }
}
