//! The libtorch runner against torchvision.
//!
//! - `ops`: our `nms`, `batched_nms`, `roi_align` and torch's sort order against
//!   torchvision.ops on randomized inputs (ties, NaN, degenerate boxes, RoIs off the map),
//!   from `$MKONNX_FIXTURES/ops/*.json` (`python reference/ops_cases.py <dir>/ops`). They
//!   must agree bit for bit.
//! - `eager_parity_*`: the whole detector against eager torchvision's golden outputs of each
//!   fixture run (`$MKONNX_FIXTURES/runs.json`, `golden/<run>/<image>.json`, written by
//!   `reference/golden.py`), one image at a time and as a batch of two different-size images:
//!   same resized and padded sizes, same proposals and detections and labels, scores within
//!   1e-4 and boxes within 1e-3 px. Everything runs with one libtorch thread, as the golden
//!   outputs were made.

#[path = "../../tests/common/mod.rs"]
mod common;
use common::fixtures_dir;

use mkonnx::data::checkpoint::load_state_dict;
use mkonnx::model::{Architecture, Detector, WeightTensor, Weights};
use mkonnx_torch::ops::{self, RoiAlignParams};
use mkonnx_torch::{image_from_rgb8, parse_device, set_num_threads, Detections, RuntimeError, TorchDetector, Trace};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Device;

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ops_case_file(name: &str) -> Value {
    read_json(&fixtures_dir().join("ops").join(format!("{name}.json")))
}

/// float32 values written as JSON numbers, or "nan" / "inf" / "-inf".
fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of floats")
        .iter()
        .map(|x| match x {
            Value::String(s) if s == "nan" => f32::NAN,
            Value::String(s) if s == "inf" => f32::INFINITY,
            Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
            x => x.as_f64().expect("a float") as f32,
        })
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().expect("an array of indices").iter().map(|x| x.as_u64().expect("an index") as usize).collect()
}

fn boxes4(v: &[f32]) -> Vec<[f32; 4]> {
    v.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

// ----------------------------------------------------------------------------- ops

#[test]
fn ops_sort_matches_torch_cpu_sort() {
    let cases = ops_case_file("sort");
    let cases = cases["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for (i, case) in cases.iter().enumerate() {
        let scores = floats(&case["scores"]);
        assert_eq!(ops::sort_descending(&scores), usizes(&case["order"]), "sort case {i} (n = {})", scores.len());
    }
}

#[test]
fn ops_nms_matches_torchvision() {
    let cases = ops_case_file("nms");
    for case in cases["cases"].as_array().unwrap() {
        let boxes = boxes4(&floats(&case["boxes"]));
        let scores = floats(&case["scores"]);
        let thr = case["iou_threshold"].as_f64().unwrap();
        let keep = ops::nms(&boxes, &scores, thr).unwrap();
        assert_eq!(keep, usizes(&case["keep"]), "nms case `{}` (threshold {thr})", case["note"]);
    }
}

#[test]
fn ops_batched_nms_matches_torchvision_on_both_paths() {
    let cases = ops_case_file("batched_nms");
    let mut paths = [0, 0];
    for case in cases["cases"].as_array().unwrap() {
        let boxes = boxes4(&floats(&case["boxes"]));
        let scores = floats(&case["scores"]);
        let idxs: Vec<i64> = case["idxs"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        let thr = case["iou_threshold"].as_f64().unwrap();
        paths[usize::from(boxes.len() * 4 > 4000)] += 1;
        let keep = ops::batched_nms(&boxes, &scores, &idxs, thr, false).unwrap();
        assert_eq!(keep, usizes(&case["keep"]), "batched_nms case `{}`", case["note"]);
    }
    assert!(paths[0] > 0 && paths[1] > 0, "cases must cover the coordinate trick and the per-class loop: {paths:?}");
}

#[test]
fn ops_roi_align_matches_torchvision_bit_for_bit() {
    let doc = ops_case_file("roi_align");
    let shape: Vec<usize> = usizes(&doc["input_shape"]);
    let shape = [shape[0], shape[1], shape[2], shape[3]];
    let input = floats(&doc["input"]);
    for (i, case) in doc["cases"].as_array().unwrap().iter().enumerate() {
        let rois: Vec<[f32; 5]> = floats(&case["rois"]).chunks_exact(5).map(|c| [c[0], c[1], c[2], c[3], c[4]]).collect();
        let size = usizes(&case["output_size"]);
        let p = RoiAlignParams {
            spatial_scale: case["spatial_scale"].as_f64().unwrap() as f32,
            pooled_height: size[0],
            pooled_width: size[1],
            sampling_ratio: case["sampling_ratio"].as_i64().unwrap() as i32,
            aligned: case["aligned"].as_bool().unwrap(),
        };
        let expected = floats(&case["output"]);
        let mut out = vec![0f32; expected.len()];
        ops::roi_align(&input, shape, &rois, &p, &mut out).unwrap();
        let mismatches: Vec<(usize, f32, f32)> =
            out.iter().zip(&expected).enumerate().filter(|(_, (a, b))| a.to_bits() != b.to_bits()).map(|(k, (a, b))| (k, *a, *b)).collect();
        assert!(
            mismatches.is_empty(),
            "roi_align case {i} ({p:?}): {} of {} values differ, first {:?}",
            mismatches.len(),
            out.len(),
            &mismatches[..mismatches.len().min(5)]
        );
    }
}

// ----------------------------------------------------------------------------- detector

/// The fixture run's detector: architecture from runs.json, torchvision's defaults with
/// the config's keyword overrides, weights from the checkpoint.
fn load_detector(run: &Value) -> Detector {
    let arch = Architecture::from_name(run["architecture"].as_str().unwrap()).expect("a known architecture");
    let checkpoint = fixtures_dir().join(run["checkpoint"].as_str().unwrap());
    let sd = load_state_dict(&checkpoint).unwrap_or_else(|e| panic!("{}: {e}", checkpoint.display()));
    let weights = Weights::from_state_dict(sd);
    let num_classes = weights.get("roi_heads.box_predictor.cls_score.weight").unwrap().shape[0];
    let mut params = arch.defaults(num_classes);
    let cfg = &run["model_config"];
    let uint = |k: &str| cfg.get(k).and_then(|v| v.as_array().and_then(|a| a.last()).unwrap_or(v).as_u64());
    let float = |k: &str| cfg.get(k).and_then(Value::as_f64).map(|v| v as f32);
    if let Some(v) = uint("min_size") {
        params.min_size = v as u32;
    }
    if let Some(v) = uint("max_size") {
        params.max_size = v as u32;
    }
    if let Some(v) = uint("rpn_pre_nms_top_n_test") {
        params.rpn_pre_nms_top_n_test = v as usize;
    }
    if let Some(v) = uint("rpn_post_nms_top_n_test") {
        params.rpn_post_nms_top_n_test = v as usize;
    }
    if let Some(v) = uint("box_detections_per_img") {
        params.box_detections_per_img = v as usize;
    }
    for (key, field) in [
        ("rpn_nms_thresh", &mut params.rpn_nms_thresh),
        ("rpn_score_thresh", &mut params.rpn_score_thresh),
        ("box_score_thresh", &mut params.box_score_thresh),
        ("box_nms_thresh", &mut params.box_nms_thresh),
    ] {
        if let Some(v) = float(key) {
            *field = v;
        }
    }
    for (key, field) in [("image_mean", &mut params.image_mean), ("image_std", &mut params.image_std)] {
        if let Some(a) = cfg.get(key).and_then(Value::as_array) {
            for (f, v) in field.iter_mut().zip(a) {
                *f = v.as_f64().unwrap() as f32;
            }
        }
    }
    Detector { arch, params, weights }
}

/// An eval image as `to_tensor(PIL.Image.open(p).convert("RGB"))`, and its pixel sum.
fn load_image(path: &Path) -> (tch::Tensor, u64) {
    let img = mkonnx::runtime::RgbImage::load(path).unwrap_or_else(|e| panic!("{e}"));
    let sum = img.chw.iter().map(|&v| (v * 255.0).round() as u64).sum();
    (mkonnx_torch::image_from_chw(img.height, img.width, &img.chw).unwrap(), sum)
}

/// The image at `rel` (a JSON string, relative to the dataset) with exactly the pixels
/// eager saw (`rgb_sum` of the golden file). mkonnx's decoder gives PIL's pixels; should a
/// JPEG still decode differently, it is read through PIL instead and listed in `pil_decoded`:
/// the runner is compared on eager's own input.
fn load_as_pil(dataset: &Path, rel: &Value, rgb_sum: Option<&Value>, pil_decoded: &mut Vec<String>) -> tch::Tensor {
    let rel = rel.as_str().unwrap();
    let path = dataset.join(rel);
    let (image, sum) = load_image(&path);
    let Some(expected) = rgb_sum.and_then(Value::as_u64) else { return image };
    if expected == sum {
        return image;
    }
    let lower = rel.to_ascii_lowercase();
    assert!(lower.ends_with(".jpg") || lower.ends_with(".jpeg"), "{rel}: decoded pixels differ from PIL's (sum {sum}, PIL {expected})");
    pil_decoded.push(rel.to_string());
    let (w, h, rgb) = pil_rgb(&path);
    assert_eq!(rgb.iter().map(|&b| u64::from(b)).sum::<u64>(), expected, "{rel}: PIL's pixels do not give the golden rgb_sum");
    image_from_rgb8(w, h, &rgb).unwrap()
}

/// `PIL.Image.open(path).convert("RGB")` through the project's Python: (width, height, bytes).
fn pil_rgb(path: &Path) -> (usize, usize, Vec<u8>) {
    let python = common::python();
    let script = "import sys; from PIL import Image; im = Image.open(sys.argv[1]).convert('RGB'); \
                  sys.stdout.buffer.write(b'%d %d\\n' % im.size + im.tobytes())";
    let out =
        std::process::Command::new(&python).args(["-c", script]).arg(path).output().unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    assert!(out.status.success(), "PIL could not read {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let split = out.stdout.iter().position(|&b| b == b'\n').expect("a size line");
    let size = String::from_utf8_lossy(&out.stdout[..split]).to_string();
    let (w, h) = size.split_once(' ').expect("width height");
    (w.parse().unwrap(), h.parse().unwrap(), out.stdout[split + 1..].to_vec())
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn rows(v: &Value) -> Vec<[f32; 4]> {
    v.as_array().unwrap().iter().map(|r| floats(r).try_into().expect("4 coordinates")).collect()
}

/// Largest differences seen against eager.
#[derive(Default, Debug)]
struct Diffs {
    score: f32,
    box_px: f32,
    proposal_px: f32,
    detections: usize,
}

fn max_abs(a: &[[f32; 4]], b: &[[f32; 4]]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

fn compare(what: &str, got: &Detections, golden: &Value, diffs: &mut Diffs) {
    let labels = ints(&golden["labels"]);
    let scores = floats(&golden["scores"]);
    let boxes = rows(&golden["boxes"]);
    assert_eq!(got.labels, labels, "{what}: labels (eager has {} detections, we have {})", labels.len(), got.labels.len());
    let ds = got.scores.iter().zip(&scores).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let db = max_abs(&got.boxes, &boxes);
    assert!(ds <= 1e-4, "{what}: scores differ by {ds}");
    assert!(db <= 1e-3, "{what}: boxes differ by {db} px");
    diffs.score = diffs.score.max(ds);
    diffs.box_px = diffs.box_px.max(db);
    diffs.detections += labels.len();
}

fn compare_trace(what: &str, trace: &Trace, golden: &Value, diffs: &mut Diffs) {
    assert_eq!(trace.original_size.to_vec(), ints(&golden["orig_size"]), "{what}: original size");
    assert_eq!(trace.resized_size.to_vec(), ints(&golden["resized_size"]), "{what}: resized size");
    assert_eq!(trace.padded_size.to_vec(), ints(&golden["padded_size"]), "{what}: padded size");
    let proposals = rows(&golden["proposals"]);
    assert_eq!(trace.proposals.len(), proposals.len(), "{what}: proposal count");
    let dp = max_abs(&trace.proposals, &proposals);
    assert!(dp <= 1e-3, "{what}: proposals differ by {dp} px");
    diffs.proposal_px = diffs.proposal_px.max(dp);
}

fn check_run(name: &str) {
    set_num_threads(1);
    let index = read_json(&fixtures_dir().join("runs.json"));
    let run =
        index["runs"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("runs.json has no run `{name}`"));
    let dataset = fixtures_dir().join(index["datasets"]["eval"].as_str().unwrap());
    let golden_dir = fixtures_dir().join(run["golden_dir"].as_str().unwrap());
    let detector = TorchDetector::new(&load_detector(run), Device::Cpu).unwrap();

    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&golden_dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no golden files", golden_dir.display());
    let mut diffs = Diffs::default();
    let mut seconds = 0.0;
    let mut pil_decoded = Vec::new();
    for file in &files {
        let golden = read_json(file);
        let image = load_as_pil(&dataset, &golden["image"], golden.get("rgb_sum"), &mut pil_decoded);
        let start = std::time::Instant::now();
        let mut out = detector.detect_traced(&[image]).unwrap();
        seconds += start.elapsed().as_secs_f64();
        let (det, trace) = out.pop().unwrap();
        let what = format!("{name} {}", file.file_name().unwrap().to_string_lossy());
        compare_trace(&what, &trace, &golden, &mut diffs);
        compare(&what, &det, &golden, &mut diffs);
    }

    // The batch of two: padded together, each image at its own resized size.
    let batches: Vec<PathBuf> =
        std::fs::read_dir(golden_dir.join("batch")).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    assert!(!batches.is_empty(), "{}: no batch golden file", golden_dir.display());
    for file in batches {
        let golden = read_json(&file);
        let images: Vec<tch::Tensor> = golden["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let stem = Path::new(n.as_str().unwrap()).file_stem().unwrap().to_string_lossy().to_string();
                let single = read_json(&golden_dir.join(format!("{stem}.json")));
                load_as_pil(&dataset, n, single.get("rgb_sum"), &mut Vec::new())
            })
            .collect();
        let out = detector.detect_traced(&images).unwrap();
        let results = golden["results"].as_array().unwrap();
        assert_eq!(out.len(), results.len());
        for (k, ((det, trace), g)) in out.iter().zip(results).enumerate() {
            let what = format!("{name} batch image {k}");
            assert_eq!(trace.padded_size.to_vec(), ints(&golden["padded_size"]), "{what}: padded size");
            assert_eq!(trace.resized_size.to_vec(), ints(&g["resized_size"]), "{what}: resized size");
            compare(&what, det, g, &mut diffs);
        }
    }
    eprintln!(
        "{name}: {} images ({} JPEGs read through PIL, the image crate decodes them differently: {pil_decoded:?}), {} detections; \
         max |score diff| {:e}, max |box diff| {:e} px, max |proposal diff| {:e} px; {:.2} s/image",
        files.len(),
        pil_decoded.len(),
        diffs.detections,
        diffs.score,
        diffs.box_px,
        diffs.proposal_px,
        seconds / files.len() as f64
    );
}

#[test]
fn eager_parity_mobilenet_v3_large_320_fpn() {
    check_run("mobilenet_v3_large_320_fpn");
}

#[test]
fn eager_parity_mobilenet_v3_large_fpn() {
    check_run("mobilenet_v3_large_fpn");
}

#[test]
fn eager_parity_resnet50_fpn() {
    check_run("resnet50_fpn");
}

#[test]
fn eager_parity_resnet50_fpn_v2() {
    check_run("resnet50_fpn_v2");
}

// ----------------------------------------------------------------------------- errors

#[test]
fn cuda_without_a_gpu_is_an_error_not_a_crash() {
    let available = tch::Cuda::is_available();
    match parse_device("cuda") {
        Ok(d) => assert!(available && d == Device::Cuda(0)),
        Err(e) => {
            assert!(!available);
            assert!(matches!(e, RuntimeError::CudaUnavailable { .. }));
            assert!(e.to_string().contains("no CUDA GPU"), "{e}");
        }
    }
    assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
    assert!(matches!(parse_device("tpu"), Err(RuntimeError::UnknownDevice(_))));
    if !available {
        let det = Detector {
            arch: Architecture::MobileNetV3Large320Fpn,
            params: Architecture::MobileNetV3Large320Fpn.defaults(2),
            weights: Weights::default(),
        };
        assert!(matches!(TorchDetector::new(&det, Device::Cuda(0)), Err(RuntimeError::CudaUnavailable { .. })));
    }
}

fn first_run_detector() -> Detector {
    let index = read_json(&fixtures_dir().join("runs.json"));
    let run = index["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["architecture"].as_str().is_some_and(|a| a.contains("resnet50_fpn") && !a.ends_with("v2")))
        .expect("a resnet50_fpn run");
    load_detector(run)
}

#[test]
fn bad_inputs_and_mismatched_weights_are_errors() {
    set_num_threads(1);
    let det = first_run_detector();
    let runner = TorchDetector::new(&det, Device::Cpu).unwrap();
    let img = tch::Tensor::zeros([3, 40, 50], (tch::Kind::Float, Device::Cpu));
    assert!(matches!(
        runner.detect(&[tch::Tensor::zeros([40, 50], (tch::Kind::Float, Device::Cpu))]),
        Err(RuntimeError::BadImage { index: 0, .. })
    ));
    assert!(matches!(
        runner.detect(&[img.shallow_clone(), tch::Tensor::zeros([3, 4, 5], (tch::Kind::Double, Device::Cpu))]),
        Err(RuntimeError::BadImage { index: 1, .. })
    ));
    assert!(matches!(runner.detect(&[tch::Tensor::zeros([3, 0, 5], (tch::Kind::Float, Device::Cpu))]), Err(RuntimeError::BadImage { .. })));
    assert!(runner.detect(&[]).unwrap().is_empty());
    // A black image runs (whatever it detects).
    assert_eq!(runner.detect(&[img.shallow_clone()]).unwrap().len(), 1);

    // Weights of another architecture: a missing tensor, named.
    let wrong = Detector { arch: Architecture::MobileNetV3LargeFpn, params: det.params.clone(), weights: det.weights.clone() };
    match TorchDetector::new(&wrong, Device::Cpu).unwrap().detect(&[img.shallow_clone()]) {
        Err(RuntimeError::Weights { source, .. }) => assert!(source.to_string().contains("backbone.body.0.0.weight"), "{source}"),
        other => panic!("expected a missing-weight error, got {:?}", other.map(|_| ())),
    }

    // A bottleneck whose last conv has the wrong width: the layers after it fail in
    // libtorch, which is reported as an error.
    let name = "backbone.body.layer1.1.conv3.weight";
    let t = det.weights.get(name).unwrap();
    let narrow = WeightTensor { shape: vec![128, t.shape[1], 1, 1], data: t.data[..128 * t.shape[1]].to_vec() };
    let weights = Weights::new(
        det.weights.names().map(|n| (n.to_string(), if n == name { narrow.clone() } else { det.weights.get(n).unwrap().clone() })),
    );
    let broken = Detector { arch: det.arch, params: det.params.clone(), weights };
    let err = TorchDetector::new(&broken, Device::Cpu).unwrap().detect(&[img]).map(|_| ()).unwrap_err();
    assert!(matches!(err, RuntimeError::Torch { .. } | RuntimeError::Weights { .. }), "{err}");
}
