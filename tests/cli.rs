//! The command line surface end to end on the binary: `convert_model.sh`'s four error
//! messages word for word, exit statuses, and help a user can learn from.

mod common;
use common::{mkonnx, text};
use std::path::Path;

fn run_dir(root: &Path, checkpoint: bool, config: bool) -> std::path::PathBuf {
    let dir = root.join("outputs/2026-02-02/15-15-47");
    std::fs::create_dir_all(dir.join(".hydra")).unwrap();
    if checkpoint {
        std::fs::write(dir.join("best_model.pth"), b"not really").unwrap();
    }
    if config {
        std::fs::write(dir.join(".hydra/config.yaml"), "model:\n  name: fasterrcnn_resnet50_fpn\n").unwrap();
    }
    dir
}

/// A small PNG to pass as `--image-input`.
fn sample_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("sample.png");
    image::RgbImage::new(8, 8).save(&img).unwrap();
    img
}

#[test]
fn option_errors_keep_the_original_wording() {
    let t = tempfile::tempdir().unwrap();
    let dir = run_dir(t.path(), true, true);
    let d = dir.to_str().unwrap();
    let o = mkonnx(&["build", d], t.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("Either --image-input or --dataset-dir must be provided"), "{}", text(&o));
    let o = mkonnx(&["build", d, "--image-input", "x.png", "--evaluate-converted-model"], t.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--evaluate-converted-model requires --dataset-dir"), "{}", text(&o));
}

#[test]
fn missing_inputs_name_the_file() {
    let t = tempfile::tempdir().unwrap();
    let img = sample_image(t.path());
    let dir = run_dir(t.path(), false, true);
    let o = mkonnx(&["build", dir.to_str().unwrap(), "--image-input", img.to_str().unwrap()], t.path());
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("Checkpoint not found: ") && out.contains("best_model.pth"), "{out}");

    let t2 = tempfile::tempdir().unwrap();
    let dir = run_dir(t2.path(), true, false);
    let o = mkonnx(&["build", dir.to_str().unwrap(), "--image-input", img.to_str().unwrap()], t2.path());
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("Hydra config not found: ") && out.contains(".hydra/config.yaml"), "{out}");

    let o = mkonnx(&["build", dir.to_str().unwrap(), "--image-input", img.to_str().unwrap(), "--checkpoint-path", "nope.pth"], t2.path());
    assert!(text(&o).contains("Checkpoint not found: ") && text(&o).contains("nope.pth"), "{}", text(&o));
}

#[test]
fn a_bad_checkpoint_fails_its_run_with_a_clear_error_and_no_model() {
    let t = tempfile::tempdir().unwrap();
    let img = sample_image(t.path());
    let dir = run_dir(t.path(), true, true);
    let o = mkonnx(&["build", dir.to_str().unwrap(), "--image-input", img.to_str().unwrap()], &t.path().join("store"));
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o);
    assert!(out.contains("best_model.pth") && !out.contains("panicked"), "{out}");
    assert!(!dir.join("onnx_model/model.onnx").exists());
}

#[test]
fn help_explains_the_commands_and_options() {
    let t = tempfile::tempdir().unwrap();
    let o = mkonnx(&["--help"], t.path());
    let out = text(&o);
    for s in ["build", "status", "graph", "gc", "coco-eval", "Examples"] {
        assert!(out.contains(s), "help lacks {s}: {out}");
    }
    let o = mkonnx(&["build", "--help"], t.path());
    let out = text(&o);
    for s in [
        "--dataset-dir",
        "--image-input",
        "--checkpoint-path",
        "--device",
        "--evaluate-converted-model",
        "--jobs",
        "--no-parity-check",
        "--store",
        "--dry-run",
        "--force",
        "--json",
        "--quantize",
        "--calibration-dir",
        "--calibration-images",
        "--calibration-method",
    ] {
        assert!(out.contains(s), "build help lacks {s}: {out}");
    }
}

#[test]
fn convert_model_sh_forwards_to_mkonnx_build() {
    let t = tempfile::tempdir().unwrap();
    let dir = run_dir(t.path(), true, true);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("convert_model.sh");
    let o = std::process::Command::new("bash")
        .arg(script)
        .arg(&dir)
        .env("MKONNX", env!("CARGO_BIN_EXE_mkonnx"))
        .env("MKONNX_STORE", t.path())
        .output()
        .unwrap();
    assert!(text(&o).contains("Either --image-input or --dataset-dir must be provided"), "{}", text(&o));
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let img = sample_image(t.path());
    let dir = run_dir(t.path(), true, true);
    let o = mkonnx(&["build", dir.to_str().unwrap(), "--image-input", img.to_str().unwrap(), "--device", "cuda"], &t.path().join("store"));
    let out = text(&o);
    if mkonnx::runtime::pytorch::check_device(mkonnx::runtime::pytorch::Device::Cuda).is_ok() {
        return; // this machine has a GPU: nothing to refuse
    }
    assert_eq!(o.status.code(), Some(1));
    assert!(out.contains("no CUDA GPU") && out.contains("--device cpu") && !out.contains("panicked"), "{out}");
}

#[test]
fn a_broken_run_does_not_stop_the_others() {
    let t = tempfile::tempdir().unwrap();
    let img = sample_image(t.path());
    let broken = run_dir(t.path(), true, true);
    std::fs::write(broken.join(".hydra/config.yaml"), "model: [unclosed\n").unwrap();
    let missing = t.path().join("no_such_run");
    let o = mkonnx(
        &["build", missing.to_str().unwrap(), broken.to_str().unwrap(), "--image-input", img.to_str().unwrap(), "--json"],
        &t.path().join("store"),
    );
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{v:#}");
    assert!(runs.iter().all(|r| r["result"] == "failed"), "{v:#}");
    let errors = v.to_string();
    assert!(errors.contains("not valid YAML") && errors.contains("Run directory not found"), "{v:#}");
}

#[test]
fn flags_out_of_range_are_refused_before_any_work() {
    let t = tempfile::tempdir().unwrap();
    let img = sample_image(t.path());
    let dir = run_dir(t.path(), true, true);
    let (d, i) = (dir.to_str().unwrap(), img.to_str().unwrap());
    for (flag, value, says) in [
        ("--jobs", "0", "0 is not in 1.."),
        ("--threads", "0", "0 is not in 1.."),
        ("--vis-score-thresh", "NaN", "use a number from 0 to 1"),
        ("--vis-score-thresh", "-inf", "use a number from 0 to 1"),
        ("--vis-score-thresh", "1.5", "use a number from 0 to 1"),
    ] {
        let o = mkonnx(&["build", d, "--image-input", i, &format!("{flag}={value}")], &t.path().join("store"));
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", text(&o));
        assert!(text(&o).contains(flag.trim_start_matches('-')) && text(&o).contains(says), "{flag} {value}: {}", text(&o));
    }
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let t = tempfile::tempdir().unwrap();
    let dir = run_dir(t.path(), true, true);
    // `mkonnx report ... | head -0`: the reader is gone before anything is written.
    let mut child = common::mkonnx_command_for(&common::mkonnx_binary(), t.path())
        .args(["report", dir.to_str().unwrap(), "--format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(101), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
}

#[test]
fn a_damaged_store_index_says_how_to_recover() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("store.sqlite"), b"SQLite format 3\0 truncated by a full disk").unwrap();
    let o = mkonnx(&["gc"], &store);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("is damaged") && out.contains("mv ") && out.contains("--store"), "{out}");
}
