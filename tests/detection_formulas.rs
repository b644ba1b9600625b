//! Each detection formula of `src/model/detection/` as the ONNX writer emits it, run in ONNX
//! Runtime, against torchvision's own function on the inputs `tests/detection_formulas.py`
//! makes (edge cases included): `BoxCoder.decode_single`, `clip_boxes_to_image`,
//! `remove_small_boxes`, `resize_boxes` and `LevelMapper`; and the pipeline's composites
//! `AnchorGenerator` (grid anchors) and `MultiScaleRoIAlign`. The libtorch runner's version of
//! the same code is checked bit for bit in torch/src/backend.rs.
//!
//! Exact formulas (clamps, comparisons, products with a float32 ratio, the level index) must
//! give torchvision's bits. Decoding goes through `exp`, whose ONNX Runtime kernel may differ
//! from ATen's by an ulp, and the corner is a difference `centre - half size` that can cancel,
//! so each decoded coordinate is held to 8 float32 ulps of the larger of its two terms.

mod common;
use common::runtimes::{Job, Tensor};
use common::*;
use mkonnx::model::anchors::cell_anchors;
use mkonnx::model::detection::pipeline::{self, PipelineOps};
use mkonnx::model::detection::{box_coder, boxes, level_mapper, DetectionOps, ImageSize};
use mkonnx::model::weights::Weights;
use mkonnx::onnx::builder::{Dim, GraphBuilder, Value as GraphValue};
use mkonnx::onnx::export::{Frames, OnnxBackend};
use mkonnx::onnx::proto::DataType;
use serde_json::Value;

/// torchvision's results (tests/detection_formulas.py).
fn torchvision_cases() -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cases.json");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/detection_formulas.py");
    let o = std::process::Command::new(python()).arg(&script).arg(&out).output().expect("run python");
    assert!(o.status.success(), "tests/detection_formulas.py failed: {}", text(&o));
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// One formula as an ONNX model: float32 inputs of the given shapes (empty = scalar), one
/// float32 output.
fn formula_model(
    job: &mut Job,
    name: &str,
    inputs: &[(&str, &[usize])],
    build: impl FnOnce(&mut OnnxBackend, &[GraphValue]) -> GraphValue,
) -> usize {
    let mut g = GraphBuilder::new();
    let values: Vec<GraphValue> = inputs
        .iter()
        .map(|(n, shape)| {
            let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Fixed(d as i64)).collect();
            g.input(n, DataType::Float, &dims)
        })
        .collect();
    let weights = Weights::new(Vec::new());
    let out = {
        let mut b = OnnxBackend::new(&mut g, &weights);
        build(&mut b, &values)
    };
    g.output(&out, "out", DataType::Float, &[]);
    let path = job.dir.path().join(format!("{name}.onnx"));
    std::fs::write(&path, mkonnx::onnx::encode(&g.finish(name, "", Vec::new()))).unwrap();
    job.add_model(&path, "onnxruntime", &["out"])
}

/// A grid-anchor case's cell anchors per level.
fn level_cells(case: &Value) -> Vec<Vec<[f32; 4]>> {
    let lists = |key: &str| -> Vec<Vec<f32>> { case[key].as_array().unwrap().iter().map(f32s).collect() };
    lists("sizes").iter().zip(lists("ratios")).map(|(s, r)| cell_anchors(s, &r)).collect()
}

/// No difference allowed (the same bits).
fn exact(values: &[f32]) -> Vec<f32> {
    vec![0.0; values.len()]
}

/// Per decoded coordinate, 8 float32 ulps of the larger of its terms, the centre and the
/// half size (computed here in float64 from the inputs).
fn decode_tolerance(deltas: &[f32], boxes: &[f32], k: usize, weights: [f64; 4]) -> Vec<f32> {
    let clip = mkonnx::model::arch::BBOX_XFORM_CLIP;
    let mut tolerance = Vec::with_capacity(deltas.len());
    for (r, b) in boxes.chunks_exact(4).enumerate() {
        let [x1, y1, x2, y2] = [b[0], b[1], b[2], b[3]].map(f64::from);
        let (w, h) = (x2 - x1, y2 - y1);
        for d in deltas[r * 4 * k..(r + 1) * 4 * k].chunks_exact(4) {
            let d: Vec<f64> = d.iter().zip(weights).map(|(&v, w)| f64::from(v) / w).collect();
            let centre_x = x1 + 0.5 * w + d[0] * w;
            let centre_y = y1 + 0.5 * h + d[1] * h;
            let half_w = 0.5 * d[2].min(clip).exp() * w;
            let half_h = 0.5 * d[3].min(clip).exp() * h;
            let x = 8.0 * f64::from(f32::EPSILON) * centre_x.abs().max(half_w.abs());
            let y = 8.0 * f64::from(f32::EPSILON) * centre_y.abs().max(half_h.abs());
            tolerance.extend([x as f32, y as f32, x as f32, y as f32]);
        }
    }
    tolerance
}

#[test]
fn every_formula_in_onnx_runtime_equals_torchvision() {
    let cases = torchvision_cases();
    let mut job = Job::new();
    // (what, model, torchvision's values, per-value tolerance; 0 = the same bits)
    let mut checks: Vec<(String, usize, Vec<f32>, Vec<f32>)> = Vec::new();

    for (i, case) in cases["decode"].as_array().unwrap().iter().enumerate() {
        let (r, k) = (case["rois"].as_u64().unwrap() as usize, case["k"].as_u64().unwrap() as usize);
        let weights: Vec<f64> = case["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
        let weights = [weights[0], weights[1], weights[2], weights[3]];
        let m = formula_model(&mut job, &format!("decode{i}"), &[("deltas", &[r, k, 4]), ("boxes", &[r, 1, 4])], |b, v| {
            box_coder::decode(b, &v[0], &v[1], weights)
        });
        job.add_run(
            m,
            &[("deltas", &[r, k, 4], Tensor::F32(f32s(&case["deltas"]))), ("boxes", &[r, 1, 4], Tensor::F32(f32s(&case["boxes"])))],
        );
        let tolerance = decode_tolerance(&f32s(&case["deltas"]), &f32s(&case["boxes"]), k, weights);
        checks.push((format!("BoxCoder{weights:?}.decode_single"), m, f32s(&case["out"]), tolerance));
    }

    let clip = &cases["clip"];
    let n = f32s(&clip["boxes"]).len() / 4;
    let m = formula_model(&mut job, "clip", &[("boxes", &[n, 4]), ("height", &[]), ("width", &[])], |b, v| {
        let size = ImageSize { height: v[1].clone(), width: v[2].clone() };
        let coords = boxes::clip_to_image(b, &v[0], &size);
        b.stack_coords(&coords)
    });
    let size = f32s(&clip["size"]);
    job.add_run(
        m,
        &[
            ("boxes", &[n, 4], Tensor::F32(f32s(&clip["boxes"]))),
            ("height", &[], Tensor::F32(vec![size[0]])),
            ("width", &[], Tensor::F32(vec![size[1]])),
        ],
    );
    let out = f32s(&clip["out"]);
    checks.push(("clip_boxes_to_image".into(), m, out.clone(), exact(&out)));

    for (i, case) in cases["small_boxes"].as_array().unwrap().iter().enumerate() {
        let n = f32s(&case["boxes"]).len() / 4;
        let min_size = case["min_size"].as_f64().unwrap();
        let m = formula_model(&mut job, &format!("small{i}"), &[("boxes", &[n, 4])], |b, v| {
            let coords = b.coords(&v[0]);
            let keep = boxes::big_enough(b, &coords, min_size);
            b.g.cast(&keep, DataType::Float)
        });
        job.add_run(m, &[("boxes", &[n, 4], Tensor::F32(f32s(&case["boxes"])))]);
        let keep: Vec<f32> = case["keep"].as_array().unwrap().iter().map(|k| if k.as_bool().unwrap() { 1.0 } else { 0.0 }).collect();
        let tolerance = exact(&keep);
        checks.push((format!("remove_small_boxes(min_size={min_size})"), m, keep, tolerance));
    }

    let resize = &cases["resize_boxes"];
    let n = f32s(&resize["boxes"]).len() / 4;
    let box_shape = [n, 4];
    let sizes: Vec<(&str, &[usize])> = vec![("boxes", &box_shape), ("rh", &[]), ("rw", &[]), ("oh", &[]), ("ow", &[])];
    let m = formula_model(&mut job, "resize", &sizes, |b, v| {
        let coords = b.coords(&v[0]);
        let resized = ImageSize { height: v[1].clone(), width: v[2].clone() };
        let original = ImageSize { height: v[3].clone(), width: v[4].clone() };
        let coords = boxes::resize_to_original(b, &coords, &resized, &original);
        b.stack_coords(&coords)
    });
    let (rs, os) = (f32s(&resize["resized"]), f32s(&resize["original"]));
    job.add_run(
        m,
        &[
            ("boxes", &[n, 4], Tensor::F32(f32s(&resize["boxes"]))),
            ("rh", &[], Tensor::F32(vec![rs[0]])),
            ("rw", &[], Tensor::F32(vec![rs[1]])),
            ("oh", &[], Tensor::F32(vec![os[0]])),
            ("ow", &[], Tensor::F32(vec![os[1]])),
        ],
    );
    let out = f32s(&resize["out"]);
    checks.push(("resize_boxes".into(), m, out.clone(), exact(&out)));

    let levels = &cases["level_mapper"];
    let n = f32s(&levels["boxes"]).len() / 4;
    let m = formula_model(&mut job, "levels", &[("boxes", &[n, 4]), ("k_min", &[]), ("k_max", &[])], |b, v| {
        level_mapper::target_levels(b, &v[0], &v[1], &v[2])
    });
    let (k_min, k_max) = (levels["k_min"].as_f64().unwrap() as f32, levels["k_max"].as_f64().unwrap() as f32);
    job.add_run(
        m,
        &[
            ("boxes", &[n, 4], Tensor::F32(f32s(&levels["boxes"]))),
            ("k_min", &[], Tensor::F32(vec![k_min])),
            ("k_max", &[], Tensor::F32(vec![k_max])),
        ],
    );
    let out = f32s(&levels["out"]);
    checks.push(("LevelMapper".into(), m, out.clone(), exact(&out)));

    // The pipeline's composites: AnchorGenerator's grid anchors and MultiScaleRoIAlign.
    for (i, case) in cases["grid_anchors"].as_array().unwrap().iter().enumerate() {
        let shapes: Vec<[usize; 4]> = case["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| [1, 1, f[0].as_u64().unwrap() as usize, f[1].as_u64().unwrap() as usize])
            .collect();
        let names: Vec<String> = (0..shapes.len()).map(|l| format!("feature{l}")).collect();
        let cells = level_cells(case);
        let padded = [case["padded"][0].as_i64().unwrap(), case["padded"][1].as_i64().unwrap()];
        let inputs: Vec<(&str, &[usize])> = names.iter().zip(&shapes).map(|(n, s)| (n.as_str(), &s[..])).collect();
        let m = formula_model(&mut job, &format!("grid_anchors{i}"), &inputs, |b, v| {
            let padded = [b.g.ints(&[padded[0]]), b.g.ints(&[padded[1]])];
            let levels: Vec<GraphValue> = v.iter().zip(&cells).map(|(f, c)| pipeline::grid_anchors(b, f, c, &padded)).collect();
            b.concat(&levels, 0)
        });
        let runs: Vec<(&str, &[usize], Tensor)> =
            names.iter().zip(&shapes).map(|(n, s)| (n.as_str(), &s[..], Tensor::F32(vec![0.0; s.iter().product()]))).collect();
        job.add_run(m, &runs);
        let out = f32s(&case["out"]);
        checks.push((format!("AnchorGenerator (padded {padded:?})"), m, out.clone(), exact(&out)));
    }

    let pool = &cases["multi_scale_roi_align"];
    let names: Vec<String> = pool["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    let features = pool["features"].as_array().unwrap();
    let shapes: Vec<Vec<usize>> =
        features.iter().map(|f| f["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()).collect();
    let boxes: Vec<f32> = pool["boxes"].as_array().unwrap().iter().flat_map(f32s).collect();
    let images = pool["boxes"].as_array().unwrap().len();
    let proposal_shape = [images, boxes.len() / 4 / images, 4];
    let tallest = pool["image_sizes"].as_array().unwrap().iter().map(|s| s[0].as_f64().unwrap() as f32).fold(0.0, f32::max);
    let map_names: Vec<String> = (0..names.len()).map(|i| format!("map{i}")).collect();
    let mut inputs: Vec<(&str, &[usize])> = map_names.iter().zip(&shapes).map(|(n, s)| (n.as_str(), &s[..])).collect();
    inputs.push(("proposals", &proposal_shape));
    let m = formula_model(&mut job, "multi_scale_roi_align", &inputs, |b, v| {
        let (maps, proposals) = v.split_at(names.len());
        // The graph's images share one size; the scales use the tallest, as torchvision does.
        let height = b.g.scalar_f32(tallest);
        let size = || ImageSize { height: height.clone(), width: height.clone() };
        let padded = [b.g.ints(&[0]), b.g.ints(&[0])];
        let frames = Frames::new(size(), size(), padded);
        pipeline::multi_scale_roi_align(b, &names, maps, &proposals[0], &frames)
    });
    let mut runs: Vec<(&str, &[usize], Tensor)> =
        map_names.iter().zip(&shapes).zip(features).map(|((n, s), f)| (n.as_str(), &s[..], Tensor::F32(f32s(&f["values"])))).collect();
    runs.push(("proposals", &proposal_shape, Tensor::F32(boxes)));
    job.add_run(m, &runs);
    let out = f32s(&pool["out"]);
    // ONNX Runtime's RoiAlign (output_half_pixel) computes torchvision's kernel's bits.
    checks.push(("MultiScaleRoIAlign".into(), m, out.clone(), exact(&out)));

    let results = job.run();
    for (what, m, expected, tolerance) in checks {
        let got = results[m][0]["out"].f32s();
        assert_eq!(got.len(), expected.len(), "{what}: output size");
        let differing = got.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let worst = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{what}: {} values, {differing} not bit-identical, largest difference {worst:e}", got.len());
        let bad = (0..got.len()).find(|&i| {
            let (a, b) = (got[i], expected[i]);
            let within = (a - b).abs() <= tolerance[i]; // false for NaN
            a.to_bits() != b.to_bits() && !within
        });
        if let Some(i) = bad {
            panic!("{what}: value {i} is {} in ONNX Runtime, {} in torchvision (allowed difference {})", got[i], expected[i], tolerance[i]);
        }
    }
}

/// `batched_nms` as the ONNX graph runs it ([`PipelineOps::batched_nms_top`]) against
/// torchvision's, on candidates as the pipeline gives it them (at least 1e-2 wide and tall:
/// the ONNX operator, unlike torchvision, reads an inverted box as its mirror image), on both
/// sides of the switch from the coordinate trick to the per-class loop: the same candidates
/// kept, by decreasing score.
#[test]
fn batched_nms_in_onnx_runtime_keeps_what_torchvision_keeps() {
    let cases = torchvision_cases();
    let mut job = Job::new();
    let mut expected = Vec::new();
    let mut paths = [0, 0];
    for (i, case) in cases["batched_nms"].as_array().unwrap().iter().enumerate() {
        let (boxes, scores, classes) = (f32s(&case["boxes"]), f32s(&case["scores"]), f32s(&case["classes"]));
        let n = scores.len();
        let class_count = case["class_count"].as_u64().unwrap() as usize;
        let iou = case["iou_threshold"].as_f64().unwrap() as f32;
        paths[usize::from(n > mkonnx::model::arch::batched_nms_trick_max_candidates(false))] += 1;
        let m = formula_model(
            &mut job,
            &format!("batched_nms{i}"),
            &[("boxes", &[1, n, 4]), ("scores", &[1, n]), ("classes", &[1, n])],
            |b, v| {
                let candidates = pipeline::Candidates { boxes: v[0].clone(), scores: v[1].clone(), classes: v[2].clone() };
                let kept = b.batched_nms_top(&candidates, 0..class_count, iou, n);
                let scores = b.g.unsqueeze(&kept.scores, &[-1]);
                let classes = b.g.unsqueeze(&kept.classes, &[-1]);
                b.concat(&[kept.boxes, scores, classes], -1)
            },
        );
        job.add_run(
            m,
            &[
                ("boxes", &[1, n, 4], Tensor::F32(boxes.clone())),
                ("scores", &[1, n], Tensor::F32(scores.clone())),
                ("classes", &[1, n], Tensor::F32(classes.clone())),
            ],
        );
        // torchvision's kept candidates, as rows (x1, y1, x2, y2, score, class).
        let keep = case["keep"].as_array().unwrap().iter().map(|k| k.as_u64().unwrap() as usize);
        let rows: Vec<[f32; 6]> =
            keep.map(|k| [boxes[4 * k], boxes[4 * k + 1], boxes[4 * k + 2], boxes[4 * k + 3], scores[k], classes[k]]).collect();
        expected.push((format!("n={n} classes={class_count} iou={iou}"), m, rows));
    }
    assert!(paths[0] > 0 && paths[1] > 0, "cases must cover the coordinate trick and the per-class loop: {paths:?}");
    let results = job.run();
    for (what, m, rows) in expected {
        let got: Vec<[f32; 6]> = results[m][0]["out"]
            .f32s()
            .chunks_exact(6)
            .filter(|r| r[4] >= 0.0) // the rest are padding (score -1)
            .map(|r| [r[0], r[1], r[2], r[3], r[4], r[5]])
            .collect();
        let bits = |r: &[[f32; 6]]| -> Vec<[u32; 6]> { r.iter().map(|r| r.map(f32::to_bits)).collect() };
        assert_eq!(got.len(), rows.len(), "batched_nms {what}: kept count");
        assert_eq!(bits(&got), bits(&rows), "batched_nms {what}: kept candidates, in order");
        eprintln!("batched_nms {what}: {} of the candidates kept, as torchvision", rows.len());
    }
}
