//! Hostile and unlucky inputs, driven through the binary as users run it: configs with
//! numbers out of range, empty or absurdly nested; images too large for memory or cut
//! short; dataset indexes with duplicate or huge ids, paths out of the dataset and a
//! byte-order mark. Each is a clear error naming the file, the key or line and the allowed
//! range or limit (never a panic, never exit 0), or the right result; the crafted files are
//! made here, and the big ones are checked for the memory and time mkonnx spends on them.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// The smallest fixture run: conversion takes a fraction of a second.
const RUN: &str = "mobilenet_v3_large_320_fpn";

/// What the big crafted inputs may cost the mkonnx process.
const PEAK_RSS_LIMIT: u64 = 512 << 20;
const TIME_LIMIT: Duration = Duration::from_secs(60);

/// A private copy of the fixture run, a store and room for crafted files.
struct Case {
    dir: tempfile::TempDir,
    run: PathBuf,
}

impl Case {
    fn new() -> Case {
        let dir = tempfile::tempdir().unwrap();
        let run = copy_run(RUN, &dir.path().join("run"), false);
        Case { dir, run }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    fn config_path(&self) -> PathBuf {
        self.run.join(".hydra/config.yaml")
    }

    /// Replaces the run's config.
    fn config(&self, yaml: &str) {
        std::fs::write(self.config_path(), yaml).unwrap();
    }

    /// The run's config with `key: value` in its model section (`kwargs.` keys in a `kwargs`
    /// sub-section), as a user edits it.
    fn model_key(&self, key: &str, value: &str) {
        let line = match key.strip_prefix("kwargs.") {
            Some(k) => format!("  kwargs:\n    {k}: {value}\n"),
            None => format!("  {key}: {value}\n"),
        };
        self.config(&format!(
            "model:\n  name: fasterrcnn_mobilenet_v3_large_320_fpn\n  num_classes: 3\n{line}dataset:\n  class_names: [up, down]\n"
        ));
    }

    /// `mkonnx build <run> --image-input <small png> --no-parity-check`.
    fn convert(&self) -> Output {
        let img = self.path("sample.png");
        noise(32, 24).save(&img).unwrap();
        mkonnx(&["build", self.run.to_str().unwrap(), "--image-input", img.to_str().unwrap(), "--no-parity-check"], &self.store())
    }

    /// A dataset directory `name` with `index` as dataset.jsonl and `images` under it.
    fn dataset(&self, name: &str, index: &str, images: &[(&str, &[u8])]) -> PathBuf {
        let ds = self.path(name);
        std::fs::create_dir_all(ds.join("data")).unwrap();
        std::fs::write(ds.join("dataset.jsonl"), index).unwrap();
        for (file, bytes) in images {
            std::fs::write(ds.join(file), bytes).unwrap();
        }
        ds
    }

    /// `mkonnx build <run> --dataset-dir <ds> --evaluate-converted-model --no-parity-check`,
    /// with the mkonnx process's peak RSS and wall time.
    fn evaluate(&self, ds: &Path) -> (Output, u64, Duration) {
        let mut cmd = mkonnx_command_for(&mkonnx_binary(), &self.store());
        cmd.args([
            "build",
            self.run.to_str().unwrap(),
            "--dataset-dir",
            ds.to_str().unwrap(),
            "--evaluate-converted-model",
            "--no-parity-check",
            "-j",
            "1",
        ]);
        let start = Instant::now();
        let (o, peak) = output_with_peak_rss(&mut cmd);
        (o, peak, start.elapsed())
    }
}

/// A noisy image (JPEG coding has real work to do on it).
fn noise(width: u32, height: u32) -> image::RgbImage {
    let mut state = 7u32;
    image::RgbImage::from_fn(width, height, |_, _| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        image::Rgb([(state >> 24) as u8, (state >> 16) as u8, (state >> 8) as u8])
    })
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// One dataset line for `image` with a box of label 1 and `extra` keys.
fn line(image: &str, extra: &str) -> String {
    format!("{{\"image\": \"{image}\", \"boxes\": [[2, 2, 20, 16]], \"labels\": [1]{extra}}}\n")
}

/// Asserts a failure that is an error, not a crash, and whose output holds every `needle`.
#[track_caller]
fn assert_error(o: &Output, needles: &[&str]) {
    let out = text(o);
    assert!(!o.status.success() && o.status.code().is_some(), "expected an error exit, got {:?}: {out}", o.status);
    assert!(!out.contains("panicked"), "{out}");
    for n in needles {
        assert!(out.contains(n), "output lacks {n:?}: {out}");
    }
}

#[test]
fn config_numbers_out_of_range_name_file_key_and_range() {
    let case = Case::new();
    let config = case.config_path();
    let config = config.to_str().unwrap();
    for (key, value, dotted, range) in [
        // 4294967616 used to wrap to 320 through u32; 0 made a model ONNX Runtime rejects.
        ("min_size", "4294967616", "model.min_size", "an integer in [1, 10000]"),
        ("min_size", "0", "model.min_size", "an integer in [1, 10000]"),
        ("kwargs.min_size", "[480, 0]", "model.kwargs.min_size[1]", "an integer in [1, 10000]"),
        ("max_size", "-5", "model.max_size", "an integer in [1, 10000]"),
        ("max_size", "640.5", "model.max_size", "an integer in [1, 10000]"),
        // NaN used to fail later as "corrupt artifact model.json".
        ("box_score_thresh", ".nan", "model.box_score_thresh", "a number in [0, 1]"),
        ("rpn_score_thresh", ".inf", "model.rpn_score_thresh", "a number in [0, 1]"),
        // Out-of-range NMS thresholds used to fail in ONNX Runtime without naming the key.
        ("kwargs.box_nms_thresh", "2", "model.kwargs.box_nms_thresh", "a number in [0, 1]"),
        ("rpn_nms_thresh", "-1", "model.rpn_nms_thresh", "a number in [0, 1]"),
        // A zero std used to give no detections and "parity OK".
        ("image_std", "[0, 0, 0]", "model.image_std[0]", "a number in (0, 1000000]"),
        ("image_mean", "[0.4, .nan, 0.4]", "model.image_mean[1]", "a number in [-1000000, 1000000]"),
        ("box_detections_per_img", "0", "model.box_detections_per_img", "an integer in [1, 1000000]"),
        ("rpn_pre_nms_top_n_test", "-150", "model.rpn_pre_nms_top_n_test", "an integer in [1, 1000000]"),
        ("kwargs.rpn_post_nms_top_n_test", "1e300", "model.kwargs.rpn_post_nms_top_n_test", "an integer in [1, 1000000]"),
        ("kwargs.num_classes", "0", "model.kwargs.num_classes", "an integer in [1, 1000000]"),
    ] {
        case.model_key(key, value);
        let o = case.convert();
        assert_error(&o, &[config, &format!("`{dotted}` should be {range}")]);
        assert!(!case.run.join("onnx_model/model.onnx").exists(), "{key}: {value}");
    }
    // In range, the same keys convert.
    case.model_key("kwargs.box_nms_thresh", "0.45");
    let o = case.convert();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn an_empty_config_is_an_error_naming_it_but_omitted_keys_are_inferred() {
    let case = Case::new();
    for empty in ["", "\n", "# nothing here\n"] {
        case.config(empty);
        let o = case.convert();
        assert_error(&o, &[case.config_path().to_str().unwrap(), "is empty"]);
        assert!(!case.run.join("onnx_model/model.onnx").exists());
    }
    // A config that merely leaves the model out still converts, from the weights.
    case.config("dataset:\n  class_names: [up, down]\n");
    let o = case.convert();
    assert!(o.status.success(), "{}", text(&o));
    let summary = std::fs::read_to_string(case.run.join("onnx_model/conversion_summary.txt")).unwrap();
    assert!(summary.contains("checkpoint weights"), "{summary}");
}

#[test]
fn a_deeply_nested_config_is_refused_before_parsing_in_bounded_time_and_memory() {
    let case = Case::new();
    // 200 KB of nested flow collections: serde_yaml took 53 s over it.
    case.config(&format!("model: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)));
    let img = case.path("sample.png");
    noise(32, 24).save(&img).unwrap();
    let mut cmd = mkonnx_command_for(&mkonnx_binary(), &case.store());
    cmd.args(["build", case.run.to_str().unwrap(), "--image-input", img.to_str().unwrap(), "--no-parity-check"]);
    let start = Instant::now();
    let (o, peak) = output_with_peak_rss(&mut cmd);
    let elapsed = start.elapsed();
    eprintln!("nested YAML: peak RSS {} MB, {elapsed:?}", peak >> 20);
    assert_error(&o, &[case.config_path().to_str().unwrap(), "deeper than 64 levels", "line 1"]);
    assert!(peak < PEAK_RSS_LIMIT, "peak RSS {peak}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

/// A PNG of `width` x `height` black pixels, streamed (the test never holds its pixels):
/// zeros compress to a file of a few hundred KB.
fn black_png(path: &Path, width: u32, height: u32) {
    use std::io::Write;
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Balanced);
    let mut writer = encoder.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    let row = vec![0u8; width as usize * 3];
    for _ in 0..height {
        stream.write_all(&row).unwrap();
    }
    stream.finish().unwrap();
}

/// A small JPEG whose header says `width` x `height`.
fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut jpeg = encode(&noise(16, 16), image::ImageFormat::Jpeg);
    let sof = jpeg.windows(2).position(|w| w[0] == 0xFF && (w[1] == 0xC0 || w[1] == 0xC2)).unwrap();
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

#[test]
fn images_over_the_pixel_limit_are_refused_in_bounded_memory() {
    let case = Case::new();
    let small = encode(&noise(32, 24), image::ImageFormat::Png);
    let ds = case.dataset("big_png", &(line("data/ok.png", "") + &line("data/big.png", "")), &[("data/ok.png", &small)]);
    black_png(&ds.join("data/big.png"), 12_000, 12_000);
    eprintln!("crafted PNG: {} KB", std::fs::metadata(ds.join("data/big.png")).unwrap().len() >> 10);
    let big_jpeg = jpeg_claiming(12_000, 12_000);
    // With its size declared, ground truth does not look at the image: the decoder must refuse.
    let declared = ", \"width\": 12000, \"height\": 12000";
    let jpeg_ds = case.dataset(
        "big_jpeg",
        &(line("data/ok.png", "") + &line("data/big.jpg", declared)),
        &[("data/ok.png", &small), ("data/big.jpg", &big_jpeg)],
    );
    for (ds, file) in [(ds, "big.png"), (jpeg_ds, "big.jpg")] {
        let (o, peak, elapsed) = case.evaluate(&ds);
        eprintln!("{file}: peak RSS {} MB, {elapsed:?}", peak >> 20);
        assert_error(&o, &[&format!("data/{file}"), "12000x12000 is 144000000 pixels", "limit of 89478485"]);
        assert!(peak < PEAK_RSS_LIMIT, "{file}: peak RSS {peak}");
        assert!(elapsed < TIME_LIMIT, "{file}: {elapsed:?}");
    }
}

#[test]
fn truncated_images_are_errors_naming_the_file() {
    let case = Case::new();
    let ok = encode(&noise(32, 24), image::ImageFormat::Png);
    let jpeg = encode(&noise(64, 48), image::ImageFormat::Jpeg);
    let png = encode(&noise(64, 48), image::ImageFormat::Png);
    for (file, bytes, says) in
        [("cut.jpg", &jpeg[..jpeg.len() / 2], "truncated"), ("cut.png", &png[..png.len() / 2], "unexpected end of file")]
    {
        let name = format!("data/{file}");
        let ds =
            case.dataset(&file.replace('.', "_"), &(line("data/ok.png", "") + &line(&name, "")), &[("data/ok.png", &ok), (&name, bytes)]);
        let (o, _, _) = case.evaluate(&ds);
        assert_error(&o, &[&name, says]);
    }
}

#[test]
fn duplicate_image_ids_name_both_lines() {
    let case = Case::new();
    let ok = encode(&noise(32, 24), image::ImageFormat::Png);
    let index = line("data/a.png", ", \"id\": 5") + &line("data/a.png", ", \"id\": 6") + &line("data/a.png", ", \"id\": 5");
    let ds = case.dataset("dup", &index, &[("data/a.png", &ok)]);
    let (o, _, _) = case.evaluate(&ds);
    assert_error(&o, &["dup/dataset.jsonl:3: image id 5 is also the id of line 1"]);
}

#[test]
fn ids_beyond_json_safe_integers_name_the_line() {
    let case = Case::new();
    let ok = encode(&noise(32, 24), image::ImageFormat::Png);
    // 2^63 used to wrap to a negative COCO id.
    let index = line("data/a.png", "") + &line("data/a.png", ", \"id\": 9223372036854775808");
    let ds = case.dataset("huge_id", &index, &[("data/a.png", &ok)]);
    let (o, _, _) = case.evaluate(&ds);
    assert_error(&o, &["huge_id/dataset.jsonl:2: id should be an integer in [0, 9007199254740991], found 9223372036854775808"]);
}

#[test]
fn image_paths_outside_the_dataset_name_the_line() {
    let case = Case::new();
    let ok = encode(&noise(32, 24), image::ImageFormat::Png);
    std::fs::write(case.path("outside.png"), &ok).unwrap();
    let absolute = case.path("outside.png");
    for image in ["../outside.png", "data/../../outside.png", absolute.to_str().unwrap()] {
        let ds = case.dataset("escape", &(line("data/a.png", "") + &line(image, "")), &[("data/a.png", &ok)]);
        let (o, _, _) = case.evaluate(&ds);
        assert_error(&o, &["escape/dataset.jsonl:2: image path", image, "is outside the dataset directory"]);
    }
}

#[test]
fn a_byte_order_mark_is_skipped_and_the_dataset_evaluates() {
    let case = Case::new();
    let (a, b) = (encode(&noise(48, 40), image::ImageFormat::Png), encode(&noise(40, 48), image::ImageFormat::Png));
    let index = format!("\u{feff}{}{}", line("data/a.png", ", \"id\": 11"), line("data/b.png", ", \"id\": 12"));
    let ds = case.dataset("bom", &index, &[("data/a.png", &a), ("data/b.png", &b)]);
    let (o, _, _) = case.evaluate(&ds);
    assert!(o.status.success(), "{}", text(&o));
    let gt = std::fs::read_to_string(case.run.join("eval_bom_model_onnx/ground_truth_coco.json")).unwrap();
    let gt: serde_json::Value = serde_json::from_str(&gt).unwrap();
    let ids: Vec<i64> = gt["images"].as_array().unwrap().iter().map(|i| i["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [11, 12]);
}
