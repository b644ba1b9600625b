//! torchvision's `GeneralizedRCNN.forward` (eval) around the network, step by step.
//!
//! Each function names the torchvision code it mirrors. Tensor work that rounds (exp,
//! sigmoid, softmax, log2, bilinear resize) is done by the same ATen ops on the same shapes
//! as eager; exact work (gathers, clamps, comparisons, +-*/ on single values) is done on
//! Rust vectors, where it is clearer and gives the same bits.

use super::backend::{Shared, TchBackend};
use super::ops::{batched_nms, python_float, roi_align, RoiAlignParams};
use super::{Detections, RoiLevels, RuntimeError, TorchContext, TorchDetector, Trace};
use mkonnx::model::arch::*;
use mkonnx::model::detection::{box_coder, boxes, level_mapper, resize::resized_size, DetectionOps, ImageSize};
use mkonnx::model::network;
use mkonnx::model::weights::WeightError;
use tch::{Device, Kind, Tensor};

/// Resized (unpadded) [height, width] of each image, as `ImageList.image_sizes`.
type Sizes = Vec<[i64; 2]>;

pub(crate) fn run(det: &TorchDetector, images: &[Tensor]) -> Result<Vec<(Detections, Trace)>, RuntimeError> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let original: Sizes = images.iter().enumerate().map(|(i, img)| check_image(i, img)).collect::<Result<_, _>>()?;
    let mut phases = PhaseTimer::from_env();
    let (batch, resized) = transform(det, images)?;
    phases.lap("transform");
    let padded = {
        let s = batch.size();
        [s[2], s[3]]
    };

    let mut backend = TchBackend::new(&det.store);
    let features = network::backbone(&mut backend, det.arch, &Shared(batch));
    let features = network_result(det, &mut backend, features)?;
    let maps: Vec<Tensor> = features.maps.into_iter().map(|m| m.0).collect();
    phases.lap("backbone+fpn");

    let proposals = rpn(det, &mut backend, &maps, padded, &resized)?;
    phases.lap("rpn");
    let pooled = multi_scale_roi_align(det, &mut backend, &features.names, &maps, &proposals, &resized)?;
    phases.lap("roi_align");
    let detections = roi_heads(det, &mut backend, pooled, &proposals, &resized)?;
    phases.lap("roi_heads");
    phases.report();

    let mut out = Vec::with_capacity(detections.len());
    for (i, (d, props)) in detections.into_iter().zip(proposals).enumerate() {
        let d = rescale(det, &mut backend, d, resized[i], original[i])?;
        out.push((d, Trace { original_size: original[i], resized_size: resized[i], padded_size: padded, proposals: props }));
    }
    Ok(out)
}

/// Wall time per inference phase, printed to stderr when `MKONNX_TORCH_PROFILE` is set (to
/// see where a slow model spends its time, next to eager PyTorch's own profile).
struct PhaseTimer {
    last: Option<std::time::Instant>,
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl PhaseTimer {
    fn from_env() -> Self {
        let on = std::env::var_os("MKONNX_TORCH_PROFILE").is_some_and(|v| !v.is_empty() && v != "0");
        PhaseTimer { last: on.then(std::time::Instant::now), laps: Vec::new() }
    }

    fn lap(&mut self, phase: &'static str) {
        if let Some(last) = self.last.as_mut() {
            let now = std::time::Instant::now();
            self.laps.push((phase, now - *last));
            *last = now;
        }
    }

    fn report(&self) {
        if self.last.is_some() {
            let laps: Vec<String> = self.laps.iter().map(|(p, d)| format!("{p} {:.1} ms", d.as_secs_f64() * 1e3)).collect();
            eprintln!("mkonnx-torch profile: {}", laps.join(", "));
        }
    }
}

/// The first error of a network call: the backend's own (libtorch's message) before the
/// weight error the description returned.
fn network_result<T>(det: &TorchDetector, backend: &mut TchBackend, r: Result<T, WeightError>) -> Result<T, RuntimeError> {
    if let Some(e) = backend.take_error() {
        return Err(e);
    }
    r.map_err(|source| RuntimeError::Weights { arch: det.arch, source })
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

// ----------------------------------------------------------------------------- transform

/// `GeneralizedRCNNTransform.forward`: normalize and resize each image, then `batch_images`.
fn transform(det: &TorchDetector, images: &[Tensor]) -> Result<(Tensor, Sizes), RuntimeError> {
    let p = &det.params;
    let step = "transform";
    let mean = Tensor::f_from_slice(&p.image_mean).and_then(|t| t.f_to_device(det.device)).and_then(|t| t.f_view([-1, 1, 1])).step(step)?;
    let std = Tensor::f_from_slice(&p.image_std).and_then(|t| t.f_to_device(det.device)).and_then(|t| t.f_view([-1, 1, 1])).step(step)?;
    let mut resized = Vec::with_capacity(images.len());
    for img in images {
        let x = img.f_to_device(det.device).step(step)?;
        // normalize: (image - mean[:, None, None]) / std[:, None, None]
        let x = x.f_sub(&mean).and_then(|t| t.f_div(&std)).step(step)?;
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
    let (ph, pw) = (ceil_to(max_h, SIZE_DIVISIBLE), ceil_to(max_w, SIZE_DIVISIBLE));
    let batch = Tensor::f_zeros([images.len() as i64, 3, ph, pw], (Kind::Float, det.device)).step(step)?;
    for (i, (img, s)) in resized.iter().zip(&sizes).enumerate() {
        let mut slot = batch.f_select(0, i as i64).and_then(|t| t.f_narrow(1, 0, s[0])).and_then(|t| t.f_narrow(2, 0, s[1])).step(step)?;
        slot.f_copy_(img).step(step)?;
    }
    Ok((batch, sizes))
}

fn ceil_to(v: i64, m: i64) -> i64 {
    (v + m - 1) / m * m
}

// ----------------------------------------------------------------------------- box coder

/// `BoxCoder.decode_single(rel_codes [R, 4k], boxes [R, 4])` → [R, 4k]: the shared
/// [`box_coder::decode`] on [R, k, 4] deltas against [R, 1, 4] boxes (the same elements
/// `rel_codes[:, i::4]` and `widths[:, None]` address).
fn decode_single(
    det: &TorchDetector,
    backend: &mut TchBackend,
    rel_codes: &Tensor,
    boxes: &Tensor,
    weights: [f64; 4],
    step: &str,
) -> Result<Tensor, RuntimeError> {
    let r = rel_codes.size()[0];
    let deltas = rel_codes.f_reshape([r, -1, 4]).step(step)?;
    let reference = boxes.f_unsqueeze(1).step(step)?;
    let Shared(decoded) = box_coder::decode(backend, &Shared(deltas), &Shared(reference), weights);
    backend_result(det, backend, decoded)?.f_flatten(1, -1).step(step)
}

/// A tensor from the detection formulas, or the first error the backend kept.
fn backend_result<T>(det: &TorchDetector, backend: &mut TchBackend, value: T) -> Result<T, RuntimeError> {
    network_result(det, backend, Ok(value))
}

/// An image size as the formulas' scalars.
fn image_size([h, w]: [i64; 2]) -> ImageSize<f64> {
    ImageSize { height: h as f64, width: w as f64 }
}

/// `clip_boxes_to_image` then the `remove_small_boxes` test, for boxes [..., 4] of one image:
/// the clipped boxes and, per box, whether it is big enough.
fn clip_and_measure(
    det: &TorchDetector,
    backend: &mut TchBackend,
    candidates: &Tensor,
    size: [i64; 2],
    min_size: f32,
    step: &str,
) -> Result<(Vec<[f32; 4]>, Vec<bool>), RuntimeError> {
    let coords = boxes::clip_to_image(backend, &Shared(candidates.shallow_clone()), &image_size(size));
    let big = boxes::big_enough(backend, &coords, f64::from(min_size));
    let Shared(clipped) = backend.stack_coords(&coords);
    let (clipped, Shared(big)) = backend_result(det, backend, (clipped, big))?;
    let big = big.f_to_kind(Kind::Float).step(step)?;
    let big = to_vec_f32(&big, step)?.into_iter().map(|v| v != 0.0).collect();
    Ok((as_boxes(&to_vec_f32(&clipped, step)?), big))
}

// ----------------------------------------------------------------------------- RPN

/// Copies a float tensor to a Vec (through the CPU).
fn to_vec_f32(t: &Tensor, step: &str) -> Result<Vec<f32>, RuntimeError> {
    let t = t.f_to_device(Device::Cpu).and_then(|t| t.f_contiguous()).step(step)?;
    let mut v = vec![0f32; t.numel()];
    t.f_copy_data(&mut v, t.numel()).step(step)?;
    Ok(v)
}

fn to_vec_i64(t: &Tensor, step: &str) -> Result<Vec<i64>, RuntimeError> {
    let t = t.f_to_device(Device::Cpu).and_then(|t| t.f_contiguous()).step(step)?;
    let mut v = vec![0i64; t.numel()];
    t.f_copy_data(&mut v, t.numel()).step(step)?;
    Ok(v)
}

fn as_boxes(v: &[f32]) -> Vec<[f32; 4]> {
    v.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

/// `RegionProposalNetwork.forward` (eval): proposals per image, resized frame.
fn rpn(
    det: &TorchDetector,
    backend: &mut TchBackend,
    maps: &[Tensor],
    padded: [i64; 2],
    sizes: &Sizes,
) -> Result<Vec<Vec<[f32; 4]>>, RuntimeError> {
    let step = "RPN";
    let p = &det.params;
    let n = sizes.len() as i64;
    if maps.len() != det.cell_anchors.len() {
        return Err(RuntimeError::Torch {
            step: step.into(),
            source: tch::TchError::Kind(format!("{} feature maps but {} anchor levels", maps.len(), det.cell_anchors.len())),
        });
    }
    let mut cls = Vec::new();
    let mut reg = Vec::new();
    let mut anchors: Vec<f32> = Vec::new();
    let mut per_level = Vec::new();
    for (map, cells) in maps.iter().zip(&det.cell_anchors) {
        let head = network::rpn_head(backend, det.arch, &Shared(map.shallow_clone()));
        let (Shared(logits), Shared(deltas)) = network_result(det, backend, head)?;
        let s = logits.size();
        let (a, h, w) = (s[1], s[2], s[3]);
        // concat_box_prediction_layers / permute_and_flatten.
        cls.push(
            logits.f_view([n, -1, 1, h, w]).and_then(|t| t.f_permute([0, 3, 4, 1, 2])).and_then(|t| t.f_reshape([n, -1, 1])).step(step)?,
        );
        reg.push(
            deltas.f_view([n, -1, 4, h, w]).and_then(|t| t.f_permute([0, 3, 4, 1, 2])).and_then(|t| t.f_reshape([n, -1, 4])).step(step)?,
        );
        per_level.push(a * h * w);
        // AnchorGenerator.grid_anchors: stride = padded size // feature size; int shifts
        // plus the rounded cell anchors (exact in float32).
        let (sh, sw) = (padded[0] / h, padded[1] / w);
        for y in 0..h {
            for x in 0..w {
                let (sx, sy) = ((x * sw) as f32, (y * sh) as f32);
                for c in cells {
                    anchors.extend_from_slice(&[sx + c[0], sy + c[1], sx + c[2], sy + c[3]]);
                }
            }
        }
    }
    let total: i64 = per_level.iter().sum();
    let objectness = Tensor::f_cat(&cls, 1).and_then(|t| t.f_flatten(0, -2)).step(step)?;
    let deltas = Tensor::f_cat(&reg, 1).and_then(|t| t.f_reshape([-1, 4])).step(step)?;
    // BoxCoder.decode: the anchors of every image, concatenated.
    let anchors = Tensor::f_from_slice(&anchors).and_then(|t| t.f_view([total, 4])).and_then(|t| t.f_to_device(det.device)).step(step)?;
    let anchors = Tensor::f_cat(&vec![&anchors; n as usize], 0).step(step)?;
    let proposals = decode_single(det, backend, &deltas, &anchors, [1.0; 4], step)?.f_view([n, -1, 4]).step(step)?;

    // filter_proposals.
    let objectness = objectness.f_reshape([n, -1]).step(step)?;
    let mut top_idx = Vec::new();
    let mut offset = 0;
    for &count in &per_level {
        let ob = objectness.f_narrow(1, offset, count).step(step)?;
        let k = (p.rpn_pre_nms_top_n_test as i64).min(count);
        let (_, idx) = ob.f_topk(k, 1, true, true).step(step)?;
        top_idx.push(idx.f_add_scalar(offset).step(step)?);
        offset += count;
    }
    let top_idx = Tensor::f_cat(&top_idx, 1).step(step)?;
    let probs = objectness.f_gather(1, &top_idx, false).and_then(|t| t.f_sigmoid()).step(step)?;
    let k = top_idx.size()[1] as usize;
    // proposals[batch_idx, top_n_idx]: [n, k, 4].
    let candidates = top_idx
        .f_unsqueeze(-1)
        .and_then(|i| i.f_expand([n, k as i64, 4], false))
        .and_then(|i| proposals.f_gather(1, &i, false))
        .step(step)?;
    let probs = to_vec_f32(&probs, step)?;
    let top_idx = to_vec_i64(&top_idx, step)?;
    let level_of = |i: i64| {
        let mut acc = 0;
        per_level.iter().position(|&c| {
            acc += c;
            i < acc
        })
    };

    let on_cuda = det.device.is_cuda();
    let nms_thresh = python_float(p.rpn_nms_thresh);
    let mut out = Vec::with_capacity(n as usize);
    for (img, size) in sizes.iter().enumerate() {
        let mut boxes = Vec::new();
        let mut scores = Vec::new();
        let mut levels = Vec::new();
        let image_candidates = candidates.f_select(0, img as i64).step(step)?;
        let (clipped, big) = clip_and_measure(det, backend, &image_candidates, *size, RPN_MIN_BOX_SIZE, step)?;
        for (j, (b, big)) in clipped.into_iter().zip(big).enumerate() {
            let i = top_idx[img * k + j];
            let s = probs[img * k + j];
            // remove_small_boxes, then scores >= score_thresh.
            if big && s >= p.rpn_score_thresh {
                boxes.push(b);
                scores.push(s);
                levels.push(level_of(i).unwrap_or(0) as i64);
            }
        }
        let keep = batched_nms(&boxes, &scores, &levels, nms_thresh, on_cuda)?;
        out.push(keep.into_iter().take(p.rpn_post_nms_top_n_test).map(|i| boxes[i]).collect());
    }
    Ok(out)
}

// ----------------------------------------------------------------------------- RoI pooling

/// `MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)` over the proposals: [R, C, 7, 7] on the
/// detector's device, rows in image order.
fn multi_scale_roi_align(
    det: &TorchDetector,
    backend: &mut TchBackend,
    names: &[String],
    maps: &[Tensor],
    proposals: &[Vec<[f32; 4]>],
    sizes: &Sizes,
) -> Result<Tensor, RuntimeError> {
    let step = "MultiScaleRoIAlign";
    let levels: Vec<&Tensor> = names.iter().zip(maps).filter(|(n, _)| ROI_FEATURE_NAMES.contains(&n.as_str())).map(|(_, m)| m).collect();
    if levels.is_empty() {
        return Err(RuntimeError::Torch { step: step.into(), source: tch::TchError::Kind("no feature map to pool from".into()) });
    }
    if det.roi_levels.get().is_none() {
        let setup = setup_scales(&levels, sizes)?;
        let _ = det.roi_levels.set(setup);
    }
    let Some(setup) = det.roi_levels.get() else {
        return Err(RuntimeError::Torch { step: step.into(), source: tch::TchError::Kind("level scales unset".into()) });
    };

    let rois: Vec<[f32; 5]> =
        proposals.iter().enumerate().flat_map(|(i, boxes)| boxes.iter().map(move |b| [i as f32, b[0], b[1], b[2], b[3]])).collect();
    let r = rois.len();
    let c = levels[0].size()[1];
    let target = if levels.len() == 1 { vec![0; r] } else { map_levels(det, backend, proposals, setup)? };

    let (ph, pw) = (ROI_OUTPUT_SIZE as usize, ROI_OUTPUT_SIZE as usize);
    let per_roi = c as usize * ph * pw;
    let mut pooled = vec![0f32; r * per_roi];
    for (level, (map, &scale)) in levels.iter().zip(&setup.scales).enumerate() {
        let members: Vec<usize> = (0..r).filter(|&i| target[i] == level as i64).collect();
        if members.is_empty() {
            continue;
        }
        let s = map.size();
        let shape = [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize];
        let input = to_vec_f32(map, step)?;
        let params = RoiAlignParams {
            spatial_scale: scale as f32,
            pooled_height: ph,
            pooled_width: pw,
            sampling_ratio: ROI_SAMPLING_RATIO as i32,
            aligned: false,
        };
        let level_rois: Vec<[f32; 5]> = members.iter().map(|&i| rois[i]).collect();
        let mut out = vec![0f32; members.len() * per_roi];
        roi_align(&input, shape, &level_rois, &params, &mut out)?;
        for (k, &i) in members.iter().enumerate() {
            pooled[i * per_roi..(i + 1) * per_roi].copy_from_slice(&out[k * per_roi..(k + 1) * per_roi]);
        }
    }
    Tensor::f_from_slice(&pooled)
        .and_then(|t| t.f_view([r as i64, c, ROI_OUTPUT_SIZE, ROI_OUTPUT_SIZE]))
        .and_then(|t| t.f_to_device(det.device))
        .step(step)
}

/// `_setup_scales`: each level's scale `2 ** round(log2(feature / image))` from the heights
/// (largest resized image of the batch), `log2` in float32 as `torch.tensor(approx).log2()`.
fn setup_scales(levels: &[&Tensor], sizes: &Sizes) -> Result<RoiLevels, RuntimeError> {
    let step = "MultiScaleRoIAlign scales";
    let max_h = sizes.iter().map(|s| s[0]).max().unwrap_or(1);
    let mut scales = Vec::new();
    for m in levels {
        let approx = m.size()[2] as f64 / max_h as f64;
        let e = Tensor::f_from_slice(&[approx as f32])
            .and_then(|t| t.f_reshape(&[] as &[i64]))
            .and_then(|t| t.f_log2())
            .and_then(|t| t.f_round())
            .step(step)?;
        let e = e.f_double_value(&[]).step(step)?;
        scales.push(2f64.powf(e));
    }
    // lvl_min = -log2(scales[0]) in float32: exact for powers of two.
    let k_min = -(scales[0] as f32).log2() as i64;
    let k_max = -(scales[scales.len() - 1] as f32).log2() as i64;
    Ok(RoiLevels { scales, k_min, k_max })
}

/// `LevelMapper.__call__` on all images' proposals: level index (0-based) per RoI.
fn map_levels(
    det: &TorchDetector,
    backend: &mut TchBackend,
    proposals: &[Vec<[f32; 4]>],
    setup: &RoiLevels,
) -> Result<Vec<i64>, RuntimeError> {
    let step = "LevelMapper";
    let flat: Vec<f32> = proposals.iter().flatten().flatten().copied().collect();
    if flat.is_empty() {
        return Ok(Vec::new());
    }
    let rois = Tensor::f_from_slice(&flat).and_then(|t| t.f_view([-1, 4])).and_then(|t| t.f_to_device(det.device)).step(step)?;
    let (k_min, k_max) = (setup.k_min as f64, setup.k_max as f64);
    let Shared(levels) = level_mapper::target_levels(backend, &Shared(rois), &k_min, &k_max);
    let levels = backend_result(det, backend, levels)?.f_to_kind(Kind::Int64).step(step)?;
    to_vec_i64(&levels, step)
}

// ----------------------------------------------------------------------------- RoI heads

/// Box head, predictor and `RoIHeads.postprocess_detections`: detections in the resized frame.
fn roi_heads(
    det: &TorchDetector,
    backend: &mut TchBackend,
    pooled: Tensor,
    proposals: &[Vec<[f32; 4]>],
    sizes: &Sizes,
) -> Result<Vec<Detections>, RuntimeError> {
    let step = "RoI heads";
    let p = &det.params;
    let r: usize = proposals.iter().map(Vec::len).sum();
    if r == 0 {
        return Ok(vec![Detections::default(); proposals.len()]);
    }
    let x = network::box_head(backend, det.arch, &Shared(pooled));
    let x = network_result(det, backend, x)?;
    let predicted = network::box_predictor(backend, &x);
    let (Shared(class_logits), Shared(box_regression)) = network_result(det, backend, predicted)?;
    let num_classes = class_logits.size()[1] as usize;

    let flat: Vec<f32> = proposals.iter().flatten().flatten().copied().collect();
    let rois = Tensor::f_from_slice(&flat).and_then(|t| t.f_view([r as i64, 4])).and_then(|t| t.f_to_device(det.device)).step(step)?;
    let w = ROI_BOX_CODER_WEIGHTS.map(python_float);
    let rel_codes = box_regression.f_reshape([r as i64, -1]).step(step)?;
    let pred_boxes = decode_single(det, backend, &rel_codes, &rois, w, step)?;
    let pred_scores = to_vec_f32(&class_logits.f_softmax(-1, None::<Kind>).step(step)?, step)?;
    if pred_boxes.numel() != r * num_classes * 4 || pred_scores.len() != r * num_classes {
        return Err(RuntimeError::Torch {
            step: step.into(),
            source: tch::TchError::Kind(format!(
                "predictor gave {} box coordinates and {} scores for {r} RoIs of {num_classes} classes",
                pred_boxes.numel(),
                pred_scores.len()
            )),
        });
    }
    let pred_boxes = pred_boxes.f_view([r as i64, num_classes as i64, 4]).step(step)?;

    let on_cuda = det.device.is_cuda();
    let nms_thresh = python_float(p.box_nms_thresh);
    let mut out = Vec::with_capacity(proposals.len());
    let mut start = 0;
    for (props, size) in proposals.iter().zip(sizes) {
        let mut boxes = Vec::new();
        let mut scores = Vec::new();
        let mut labels = Vec::new();
        let image_boxes = pred_boxes.f_narrow(0, start as i64, props.len() as i64).step(step)?;
        let (clipped, big) = clip_and_measure(det, backend, &image_boxes, *size, DETECTION_MIN_BOX_SIZE, step)?;
        // Every (proposal, foreground class) pair, row-major, as boxes[:, 1:].reshape(-1, 4).
        for row in 0..props.len() {
            for class in 1..num_classes {
                let (b, big) = (clipped[row * num_classes + class], big[row * num_classes + class]);
                let s = pred_scores[(start + row) * num_classes + class];
                if s > p.box_score_thresh && big {
                    boxes.push(b);
                    scores.push(s);
                    labels.push(class as i64);
                }
            }
        }
        start += props.len();
        let keep = batched_nms(&boxes, &scores, &labels, nms_thresh, on_cuda)?;
        let keep = &keep[..keep.len().min(p.box_detections_per_img)];
        out.push(Detections {
            boxes: keep.iter().map(|&i| boxes[i]).collect(),
            scores: keep.iter().map(|&i| scores[i]).collect(),
            labels: keep.iter().map(|&i| labels[i]).collect(),
        });
    }
    Ok(out)
}

/// `transform.postprocess`: the boxes back to the original image ([`boxes::resize_to_original`]).
fn rescale(
    det: &TorchDetector,
    backend: &mut TchBackend,
    mut d: Detections,
    resized: [i64; 2],
    original: [i64; 2],
) -> Result<Detections, RuntimeError> {
    let step = "postprocess";
    let flat: Vec<f32> = d.boxes.iter().flatten().copied().collect();
    let detected = Tensor::f_from_slice(&flat).and_then(|t| t.f_view([-1, 4])).step(step)?;
    let coords = backend.coords(&Shared(detected));
    let coords = boxes::resize_to_original(backend, &coords, &image_size(resized), &image_size(original));
    let Shared(rescaled) = backend.stack_coords(&coords);
    let rescaled = backend_result(det, backend, rescaled)?;
    d.boxes = as_boxes(&to_vec_f32(&rescaled, step)?);
    Ok(d)
}
