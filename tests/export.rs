//! The native ONNX export against torchvision's eager model: for every fixture run of every
//! architecture, our model.onnx in ONNX Runtime gives the golden eager detections (same
//! count and labels, |score| <= 1e-3, |box| <= 0.1 px); batches give each image its own
//! result; an image without detections gives N = 0; onnx.checker accepts every model.

mod common;
use common::*;
use mkonnx::eval::parity::{compare, Tolerance, ONNX_TOLERANCE};
use mkonnx::model::Detector;
use mkonnx::runtime::onnx::OnnxDetector;
use mkonnx::runtime::{Detections, ImageBatch, RgbImage};

use std::path::{Path, PathBuf};

fn export(det: &Detector, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{}.onnx", det.arch));
    std::fs::write(&path, mkonnx::onnx::encode(&mkonnx::onnx::export(det).unwrap())).unwrap();
    path
}

#[test]
fn every_architecture_matches_torchvision_eager() {
    let t = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for run in all_runs() {
        let det = detector(&run);
        let model = export(&det, t.path());
        let onnx = OnnxDetector::load(&model, 1).unwrap();
        let mut sizes = std::collections::BTreeSet::new();
        for (g, image) in golden(&run) {
            let img = RgbImage::load(&image).unwrap();
            assert_eq!(rgb_sum(&img), g["rgb_sum"].as_u64().unwrap(), "{} decodes differently from PIL", image.display());
            sizes.insert((img.height, img.width));
            let ours = onnx.detect(&img.to_batch()).unwrap().remove(0);
            let r = compare(&golden_detections(&g), &ours, ONNX_TOLERANCE, det.params.box_score_thresh);
            for flip in &r.flips_at_cut {
                eprintln!("{} {}: near-tie flip at a cut: {flip}", run["name"], g["image"]);
            }
            assert!(r.passed(ONNX_TOLERANCE), "{} on {}: {r:#?}", run["name"], g["image"]);
            report.push(format!(
                "{} {}: {} dets, max score diff {:.2e}, max box diff {:.4} px",
                run["name"], g["image"], r.reference, r.max_score_diff, r.max_box_diff
            ));
        }
        assert!(sizes.len() > 1, "one model file serves several image sizes");
    }
    eprintln!("{}", report.join("\n"));
}

/// Same-size images stacked along the batch axis (the image, mirrored, flipped).
fn variants(img: &RgbImage, n: usize) -> Vec<RgbImage> {
    let (h, w) = (img.height, img.width);
    let mirrored = |flip_x: bool, flip_y: bool| {
        let mut chw = vec![0.0; img.chw.len()];
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let (sx, sy) = (if flip_x { w - 1 - x } else { x }, if flip_y { h - 1 - y } else { y });
                    chw[c * h * w + y * w + x] = img.chw[c * h * w + sy * w + sx];
                }
            }
        }
        RgbImage { height: h, width: w, chw }
    };
    [img.clone(), mirrored(true, false), mirrored(false, true), mirrored(true, true)].into_iter().take(n).collect()
}

#[test]
fn batches_give_each_image_its_own_result() {
    let t = tempfile::tempdir().unwrap();
    let tight = Tolerance { score: 1e-4, box_px: 0.01 };
    for name in ["mobilenet_v3_large_320_fpn", "resnet50_fpn"] {
        let run = run(name);
        let det = detector(&run);
        let onnx = OnnxDetector::load(&export(&det, t.path()), 1).unwrap();
        let (_, image) = golden(&run).remove(0);
        let img = RgbImage::load(&image).unwrap();
        for n in [2, 4] {
            let imgs = variants(&img, n);
            let singles: Vec<Detections> = imgs.iter().map(|i| onnx.detect(&i.to_batch()).unwrap().remove(0)).collect();
            let batch = ImageBatch::stack(&imgs.iter().collect::<Vec<_>>()).unwrap();
            let batched = onnx.detect(&batch).unwrap();
            assert_eq!(batched.len(), n);
            for (i, (s, b)) in singles.iter().zip(&batched).enumerate() {
                let r = compare(s, b, tight, det.params.box_score_thresh);
                assert!(r.passed(tight) && r.flips_at_cut.is_empty(), "{name} batch {n} image {i}: {r:#?}");
            }
        }
    }
}

#[test]
fn no_detections_gives_n_zero() {
    let t = tempfile::tempdir().unwrap();
    let mut det = detector(&run("mobilenet_v3_large_320_fpn"));
    det.params.box_score_thresh = 1.0; // no score can exceed it
    let onnx = OnnxDetector::load(&export(&det, t.path()), 1).unwrap();
    let (_, image) = golden(&run("mobilenet_v3_large_320_fpn")).remove(0);
    let img = RgbImage::load(&image).unwrap();
    let out = onnx.detect(&ImageBatch::stack(&variants(&img, 2).iter().collect::<Vec<_>>()).unwrap()).unwrap();
    assert!(out.iter().all(|d| d.is_empty()), "{out:?}");
}

#[test]
fn onnx_checker_accepts_every_model() {
    let t = tempfile::tempdir().unwrap();
    for run in all_runs() {
        let model = export(&detector(&run), t.path());
        let o = std::process::Command::new(python())
            .args(["-c", "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True); print('ok')"])
            .arg(&model)
            .output()
            .unwrap();
        assert!(o.status.success() && text(&o).contains("ok"), "{}: {}", run["name"], text(&o));
    }
}
