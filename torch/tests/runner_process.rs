//! The runner process as mkonnx's stages use it (`mkonnx::runtime::pytorch`): two runner
//! processes agree bit for bit, they agree with the in-process detector within the eager
//! tolerances (the test harness runs it on a worker thread, where MKL may round the last bit
//! differently than on a process's main thread), batches work, and a bad setup is an error
//! message, not a dead pipe.

#[path = "../../tests/common/mod.rs"]
mod common;

use mkonnx::data::run_dir::RunDir;
use mkonnx::eval::parity::{compare, Tolerance};
use mkonnx::model::Detector;
use mkonnx::runtime::pytorch::{Device, PytorchError, PytorchRunner, RunnerSetup};
use mkonnx::runtime::{ImageBatch, RgbImage};
use std::path::PathBuf;

fn runner_setup(run: &str) -> (RunnerSetup, Detector) {
    std::env::set_var(mkonnx::runtime::pytorch::RUNNER_ENV, env!("CARGO_BIN_EXE_mkonnx-torch"));
    let dir = common::fixtures_dir().join(common::run(run)["run_dir"].as_str().unwrap());
    let run = RunDir::locate(&dir, None).unwrap();
    let detector = mkonnx::model::Detector::load_run(&run).unwrap();
    let setup =
        RunnerSetup { checkpoint: run.checkpoint, arch: detector.arch, params: detector.params.clone(), device: Device::Cpu, threads: 1 };
    (setup, detector)
}

fn eval_images(n: usize) -> Vec<RgbImage> {
    let mut paths: Vec<PathBuf> = common::eval_dataset().join("data").read_dir().unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths.iter().take(n).map(|p| RgbImage::load(p).unwrap()).collect()
}

#[test]
fn runners_are_deterministic_and_agree_with_the_in_process_detector() {
    let (setup, detector) = runner_setup("mobilenet_v3_large_320_fpn");
    let mut runner = PytorchRunner::start(&setup).unwrap();
    let mut runner2 = PytorchRunner::start(&setup).unwrap();
    mkonnx_torch::set_num_threads(1);
    let local = mkonnx_torch::TorchDetector::new(&detector, tch::Device::Cpu).unwrap();
    for img in eval_images(3) {
        let remote = runner.detect(&img.to_batch()).unwrap();
        let remote2 = runner2.detect(&img.to_batch()).unwrap();
        assert_eq!(remote, remote2, "two runners");
        let tensor = mkonnx_torch::image_from_chw(img.height, img.width, &img.chw).unwrap();
        let here = local.detect(&[tensor]).unwrap();
        let r = compare(&here[0], &remote[0], Tolerance { score: 1e-4, box_px: 1e-3 }, detector.params.box_score_thresh);
        assert!(r.passed(Tolerance { score: 1e-4, box_px: 1e-3 }), "{r:?}");
    }
    // A batch of two copies of one image: one result per image, each the single-image one
    // (within the tolerances: a batch of two runs the convolutions with other shapes).
    let img = &eval_images(1)[0];
    let single = runner.detect(&img.to_batch()).unwrap().remove(0);
    let pair = runner.detect(&ImageBatch::stack(&[img, img]).unwrap()).unwrap();
    assert_eq!(pair.len(), 2);
    for d in &pair {
        let r = compare(&single, d, Tolerance { score: 1e-4, box_px: 1e-3 }, detector.params.box_score_thresh);
        assert!(r.passed(Tolerance { score: 1e-4, box_px: 1e-3 }), "{r:?}");
    }
    // A malformed batch is refused before it reaches the runner, which stays usable.
    let bad = ImageBatch { len: 2, height: 4, width: 4, data: vec![0.0; 7] };
    assert!(matches!(runner.detect(&bad), Err(PytorchError::Runner(_))));
    assert_eq!(runner.detect(&img.to_batch()).unwrap().len(), 1);
}

#[test]
fn a_bad_setup_is_the_runners_error_message() {
    let (mut setup, _) = runner_setup("mobilenet_v3_large_320_fpn");
    setup.checkpoint = PathBuf::from("/nonexistent/best_model.pth");
    let err = PytorchRunner::start(&setup).err().expect("no checkpoint, no runner");
    assert!(matches!(err, PytorchError::Runner(_)) && err.to_string().contains("/nonexistent/best_model.pth"), "{err}");

    // Weights of another architecture: the missing tensor is named, the runner does not die.
    let (mut setup, _) = runner_setup("mobilenet_v3_large_320_fpn");
    setup.arch = mkonnx::model::Architecture::ResNet50Fpn;
    let batch = eval_images(1)[0].to_batch();
    let mut runner = PytorchRunner::start(&setup).unwrap();
    let err = runner.detect(&batch).expect_err("wrong architecture");
    assert!(matches!(err, PytorchError::Runner(_)) && err.to_string().contains("is the architecture right?"), "{err}");
    assert!(runner.detect(&batch).is_err(), "still answering");
}

/// The runner process, as `mkonnx build` runs it, against eager torchvision's golden outputs
/// for every fixture run and eval image: the same detections and labels, bit for bit (one
/// libtorch thread on the process's main thread, as eager ran).
#[test]
fn the_runner_process_equals_eager_on_every_fixture_run() {
    let index = common::runs_index();
    for run in index["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let (setup, _) = runner_setup(name);
        let mut runner = PytorchRunner::start(&setup).unwrap();
        let golden_dir = common::fixtures_dir().join(run["golden_dir"].as_str().unwrap());
        let mut files: Vec<PathBuf> = std::fs::read_dir(&golden_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: no golden files", golden_dir.display());
        let mut checked = 0;
        for file in files {
            let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            let image = common::eval_dataset().join(golden["image"].as_str().unwrap());
            let got = runner.detect(&RgbImage::load(&image).unwrap().to_batch()).unwrap().remove(0);
            let eager: mkonnx::runtime::Detections = serde_json::from_value(serde_json::json!({
                "boxes": golden["boxes"], "scores": golden["scores"], "labels": golden["labels"]
            }))
            .unwrap();
            assert_eq!(got, eager, "{name} {}", file.display());
            checked += 1;
        }
        eprintln!("{name}: {checked} images equal to eager");
    }
}
