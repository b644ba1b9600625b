//! The same model.onnx in a second runtime: OpenVINO (CPU, float32, one thread, through
//! `tests/openvino_infer.py` and the `openvino` wheel of the project environment) must give
//! torchvision eager's detections on every fixture architecture and test image, with the
//! tolerances of the ONNX Runtime test (same count and labels, |score| <= 1e-3,
//! |box| <= 0.1 px), and a batch must give each image its own result. The resize size, which
//! OpenVINO 2026.4 used to get wrong (see `eager_resize_hw` in src/onnx/export.rs), is checked
//! against Python's double arithmetic for every image size up to 1500 px in both runtimes.
//!
//! OpenVINO's results are compared with the goldens, not with ONNX Runtime's. A missing
//! `openvino` package fails the tests: it is part of `reference/requirements.txt`.

mod common;
use common::runtimes::{Job, Output, Tensor};
use common::*;
use mkonnx::eval::parity::{compare, Tolerance, ONNX_TOLERANCE};
use mkonnx::onnx::builder::{Dim, GraphBuilder};
use mkonnx::onnx::proto::DataType;
use mkonnx::runtime::{Detections, ImageBatch, RgbImage};
use std::collections::BTreeMap;

/// A detector's outputs as each image's detections in pixels, as `OnnxDetector::detect`
/// reads them (rows with category 0 pad a smaller image of the batch).
fn detections(out: &BTreeMap<String, Output>, height: usize, width: usize) -> Vec<Detections> {
    let (location, score, category) = (out["location"].f32s(), out["score"].f32s(), out["category"].i64s());
    let (b, n) = (out["score"].shape[0], out["score"].shape[1]);
    assert_eq!((location.len(), category.len()), (b * n * 4, b * n));
    let (wf, hf) = (width as f32, height as f32);
    (0..b)
        .map(|i| {
            let mut d = Detections::default();
            for k in i * n..(i + 1) * n {
                if category[k] == 0 {
                    continue;
                }
                let l = &location[k * 4..k * 4 + 4];
                d.boxes.push([l[0] * wf, l[1] * hf, l[2] * wf, l[3] * hf]);
                d.scores.push(score[k]);
                d.labels.push(category[k]);
            }
            d
        })
        .collect()
}

/// The image mirrored left-right (same size, so it can share a batch with the original).
fn mirrored(img: &RgbImage) -> RgbImage {
    let (h, w) = (img.height, img.width);
    let mut chw = vec![0.0; img.chw.len()];
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                chw[c * h * w + y * w + x] = img.chw[c * h * w + y * w + (w - 1 - x)];
            }
        }
    }
    RgbImage { height: h, width: w, chw }
}

#[test]
fn every_architecture_matches_torchvision_eager_in_openvino() {
    let runs = all_runs();
    let mut job = Job::new();
    let mut cases = Vec::new();
    for run in &runs {
        let det = detector(run);
        let m = job.add_detector(&det);
        let gs = golden(run);
        let mut sizes = Vec::new();
        for (g, image) in &gs {
            let img = RgbImage::load(image).unwrap();
            assert_eq!(rgb_sum(&img), g["rgb_sum"].as_u64().unwrap(), "{} decodes differently from PIL", image.display());
            job.add_batch(m, &img.to_batch());
            sizes.push((img.height, img.width));
        }
        // A batch of two (the first image and its mirror image), then the mirror image alone.
        let first = RgbImage::load(&gs[0].1).unwrap();
        let flipped = mirrored(&first);
        job.add_batch(m, &ImageBatch::stack(&[&first, &flipped]).unwrap());
        job.add_batch(m, &flipped.to_batch());
        sizes.extend([(first.height, first.width); 2]);
        assert!(sizes.iter().collect::<std::collections::BTreeSet<_>>().len() > 1, "one model file serves several image sizes");
        cases.push((run["name"].as_str().unwrap().to_string(), det, gs, sizes));
    }
    let results = job.run();

    let mut report = Vec::new();
    let mut failures = Vec::new();
    for ((name, det, gs, sizes), out) in cases.iter().zip(&results) {
        let out: Vec<Vec<Detections>> = out.iter().zip(sizes).map(|(o, &(h, w))| detections(o, h, w)).collect();
        let (mut worst_score, mut worst_box) = (0f32, 0f32);
        for ((g, _), ours) in gs.iter().zip(&out) {
            let r = compare(&golden_detections(g), &ours[0], ONNX_TOLERANCE, det.params.box_score_thresh);
            for flip in &r.flips_at_cut {
                eprintln!("{name} {}: near-tie flip at a cut: {flip}", g["image"]);
            }
            if !r.passed(ONNX_TOLERANCE) {
                failures.push(format!("{name} on {}: {r:#?}", g["image"]));
            }
            worst_score = worst_score.max(r.max_score_diff);
            worst_box = worst_box.max(r.max_box_diff);
            report.push(format!(
                "{name} {}: {} dets (OpenVINO {}), max score diff {:.2e}, max box diff {:.4} px",
                g["image"], r.reference, r.candidate, r.max_score_diff, r.max_box_diff
            ));
        }
        report.push(format!("{name}: every image, max score diff {worst_score:.2e}, max box diff {worst_box:.4} px"));

        // The batch of two gives each image its batch-1 result.
        let n = gs.len();
        let tight = Tolerance { score: 1e-4, box_px: 0.01 };
        for (i, (single, batched)) in [&out[0][0], &out[n + 1][0]].into_iter().zip(&out[n]).enumerate() {
            assert_eq!(out[n].len(), 2);
            let r = compare(single, batched, tight, det.params.box_score_thresh);
            if !(r.passed(tight) && r.flips_at_cut.is_empty()) {
                failures.push(format!("{name} batch of 2, image {i}: {r:#?}"));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "OpenVINO disagrees with torchvision eager:\n{}", failures.join("\n"));
}

/// torchvision's eager size, in f64 as Python computes it: int(x * min(mn / short, mx / long)).
/// torchvision's resize size (the definition the libtorch runner uses, itself checked against
/// eager PyTorch's resized sizes in torch/tests/torch_runner.rs).
fn eager_size(h: i64, w: i64, mn: u32, mx: u32) -> [i64; 2] {
    mkonnx::model::detection::resize::resized_size(h, w, mn, mx)
}

#[test]
fn resize_size_equals_eager_for_every_image_size_in_both_runtimes() {
    // Every (h, w) up to 1500 px, and sizes up to 32767 px (the documented limit) in steps.
    let mut hw: Vec<i64> = Vec::new();
    for h in 1..=1500 {
        for w in 1..=1500 {
            hw.extend([h, w]);
        }
    }
    for h in (1..32768).step_by(997).chain([32767]) {
        for w in (1..32768).step_by(89).chain([1, 2, 3, 32767]) {
            hw.extend([h, w]);
        }
    }
    let n = hw.len() / 2;
    let mut job = Job::new();
    let mut models = Vec::new();
    for (mn, mx) in [(800, 1333), (320, 640), (600, 1000), (1024, 1024)] {
        let mut g = GraphBuilder::new();
        let input = g.input("hw", DataType::Int64, &[Dim::Named("n"), Dim::Fixed(2)]);
        let out = mkonnx::onnx::export::eager_resize_hw(&mut g, &input, mn, mx);
        g.output(&out, "resized", DataType::Int64, &[Dim::Named("n"), Dim::Fixed(2)]);
        let path = job.dir.path().join(format!("size_{mn}_{mx}.onnx"));
        std::fs::write(&path, mkonnx::onnx::encode(&g.finish("resize", "", Vec::new()))).unwrap();
        for runtime in ["openvino", "onnxruntime"] {
            let m = job.add_model(&path, runtime, &["resized"]);
            job.add_run(m, &[("hw", &[n, 2], Tensor::I64(hw.clone()))]);
            models.push((mn, mx, runtime));
        }
    }
    let results = job.run();
    for ((mn, mx, runtime), out) in models.iter().zip(&results) {
        let got = out[0]["resized"].i64s();
        assert_eq!(got.len(), hw.len());
        let wrong: Vec<String> = hw
            .chunks_exact(2)
            .zip(got.chunks_exact(2))
            .filter(|(x, y)| eager_size(x[0], x[1], *mn, *mx) != [y[0], y[1]])
            .take(5)
            .map(|(x, y)| format!("{}x{} -> {}x{} (eager {:?})", x[0], x[1], y[0], y[1], eager_size(x[0], x[1], *mn, *mx)))
            .collect();
        assert!(wrong.is_empty(), "{runtime}, min_size {mn}, max_size {mx}: {wrong:?}");
    }
}
