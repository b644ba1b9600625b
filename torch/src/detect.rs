//! torchvision's `GeneralizedRCNN.forward` (eval) on libtorch: `GeneralizedRCNNTransform`
//! here, then the shared pipeline ([`mkonnx::model::detection::pipeline`]) on
//! [`TchBackend`], which runs it as eager PyTorch's ATen calls.

use super::backend::{to_boxes, to_vec, Shared, TchBackend, TchFrames};
use super::{Detections, RuntimeError, TorchContext, TorchDetector, Trace};
use mkonnx::model::detection::pipeline;
use mkonnx::model::detection::resize::resized_size;
use tch::{Kind, Tensor};

/// Resized (unpadded) [height, width] of each image, as `ImageList.image_sizes`.
type Sizes = Vec<[i64; 2]>;

pub(crate) fn run(det: &TorchDetector, images: &[Tensor]) -> Result<Vec<(Detections, Trace)>, RuntimeError> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let original: Sizes = images.iter().enumerate().map(|(i, img)| check_image(i, img)).collect::<Result<_, _>>()?;
    let mut backend = TchBackend::for_detector(&det.store, det.device, &det.roi_levels);
    let (batch, resized) = transform(det, &mut backend, images)?;
    pipeline::PipelineOps::phase_done(&mut backend, "transform");
    let padded = {
        let s = batch.size();
        [s[2], s[3]]
    };
    let sizes: Vec<([i64; 2], [i64; 2])> = resized.iter().copied().zip(original.iter().copied()).collect();
    let frames = TchFrames::new(&sizes, padded);
    let result = pipeline::detect(&mut backend, det.arch, &det.params, &Shared(batch), &frames);
    // The backend's own error (libtorch's message) comes before the one the description returned.
    if let Some(e) = backend.take_error() {
        return Err(e);
    }
    let (proposals, detections) = result.map_err(|source| RuntimeError::Weights { arch: det.arch, source })?;
    backend.report_phases();

    let step = "detections";
    let mut out = Vec::with_capacity(images.len());
    for (i, proposals) in proposals.iter().enumerate() {
        let d = Detections {
            boxes: to_boxes(&detections.boxes[i].0, step)?,
            scores: to_vec::<f32>(&detections.scores[i].0, step)?,
            labels: to_vec::<i64>(&detections.classes[i].0, step)?,
        };
        let trace =
            Trace { original_size: original[i], resized_size: resized[i], padded_size: padded, proposals: to_boxes(&proposals.0, step)? };
        out.push((d, trace));
    }
    Ok(out)
}

fn check_image(index: usize, img: &Tensor) -> Result<[i64; 2], RuntimeError> {
    let bad = |reason: String| RuntimeError::BadImage { index, reason };
    if !img.defined() {
        return Err(bad("undefined tensor".into()));
    }
    let size = img.size();
    if size.len() != 3 || size[0] != 3 {
        return Err(bad(format!("expected a [3, H, W] tensor, got {size:?}")));
    }
    if size[1] == 0 || size[2] == 0 {
        return Err(bad(format!("empty image {size:?}")));
    }
    match img.f_kind() {
        Ok(Kind::Float) => Ok([size[1], size[2]]),
        Ok(k) => Err(bad(format!("expected float32 values in 0..1, got {k:?}"))),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// `GeneralizedRCNNTransform.forward`: normalize and resize each image, then `batch_images`.
fn transform(det: &TorchDetector, backend: &mut TchBackend, images: &[Tensor]) -> Result<(Tensor, Sizes), RuntimeError> {
    let p = &det.params;
    let step = "transform";
    let mut resized = Vec::with_capacity(images.len());
    for img in images {
        let x = img.f_to_device(det.device).step(step)?;
        let Shared(x) = pipeline::normalize(backend, p, &Shared(x));
        if let Some(e) = backend.take_error() {
            return Err(e);
        }
        let size = x.size();
        let [h, w] = resized_size(size[1], size[2], p.min_size, p.max_size);
        // F.interpolate(image[None], scale_factor=s, mode="bilinear", recompute_scale_factor=True,
        // align_corners=False)[0]: upsample_bilinear2d to the computed size, no scales.
        let x =
            x.f_unsqueeze(0).and_then(|t| t.f_upsample_bilinear2d([h, w], false, None, None)).and_then(|t| t.f_select(0, 0)).step(step)?;
        resized.push(x);
    }
    let sizes: Sizes = resized.iter().map(|t| [t.size()[1], t.size()[2]]).collect();
    // batch_images: zero-filled [B, C, ceil32(max H), ceil32(max W)], each image top-left.
    let max_h = sizes.iter().map(|s| s[0]).max().unwrap_or(0);
    let max_w = sizes.iter().map(|s| s[1]).max().unwrap_or(0);
    let (ph, pw) = (pipeline::padded_side(backend, &max_h), pipeline::padded_side(backend, &max_w));
    let batch = Tensor::f_zeros([images.len() as i64, 3, ph, pw], (Kind::Float, det.device)).step(step)?;
    for (i, (img, s)) in resized.iter().zip(&sizes).enumerate() {
        let mut slot = batch.f_select(0, i as i64).and_then(|t| t.f_narrow(1, 0, s[0])).and_then(|t| t.f_narrow(2, 0, s[1])).step(step)?;
        slot.f_copy_(img).step(step)?;
    }
    Ok((batch, sizes))
}
