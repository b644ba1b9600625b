//! `mkonnx build` end to end on a real trained run: the outputs of docs/DESIGN.md section 3, the
//! comparison, and the build engine's promises — a rerun does nothing, each input change
//! reruns exactly the stages that depend on it, deleted outputs are restored, concurrent
//! processes build each stage once, and a killed build leaves the next one correct.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const RUN: &str = "mobilenet_v3_large_320_fpn";

fn build_json(run_dir: &Path, store: &Path, extra: &[&str]) -> Value {
    let ds = eval_dataset();
    let mut args =
        vec!["build", run_dir.to_str().unwrap(), "--dataset-dir", ds.to_str().unwrap(), "--evaluate-converted-model", "--json", "-j", "1"];
    args.extend_from_slice(extra);
    let o = mkonnx(&args, store);
    let out: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&o)));
    assert!(o.status.success(), "{}", text(&o));
    out
}

/// stage → outcome of the first run.
fn outcomes(v: &Value) -> BTreeMap<String, String> {
    v["runs"][0]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stage"].as_str().unwrap().to_string(), s["outcome"].as_str().unwrap().to_string()))
        .collect()
}

fn rebuilt(v: &Value) -> Vec<String> {
    outcomes(v).into_iter().filter(|(_, o)| o == "built").map(|(s, _)| s).collect()
}

#[test]
fn build_writes_the_contract_outputs_and_reruns_only_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let run_dir = copy_run(RUN, &t.path().join("run"), false);
    let ds_name = eval_dataset().file_name().unwrap().to_string_lossy().into_owned();

    let first = build_json(&run_dir, &store, &[]);
    assert_eq!(rebuilt(&first).len(), 9, "{first:#}");
    let onnx_eval = run_dir.join(format!("eval_{ds_name}_model_onnx"));
    let pt_eval = run_dir.join(format!("eval_{ds_name}_best_model_pth"));
    for f in [
        run_dir.join("onnx_model/model.onnx"),
        run_dir.join("onnx_model/conversion_summary.txt"),
        run_dir.join("onnx_model/comparison.json"),
        onnx_eval.join("onnx_metrics.json"),
        onnx_eval.join("onnx_predictions.json"),
        onnx_eval.join("ground_truth_coco.json"),
        onnx_eval.join("visualizations/0000_detected.png"),
        pt_eval.join("pytorch_metrics.json"),
        pt_eval.join("pytorch_predictions.json"),
    ] {
        assert!(f.is_file(), "missing {}", f.display());
    }
    let summary = std::fs::read_to_string(run_dir.join("onnx_model/conversion_summary.txt")).unwrap();
    assert!(
        summary.contains("fasterrcnn_mobilenet_v3_large_320_fpn") && summary.contains("parity OK") && summary.contains("opset"),
        "{summary}"
    );

    // The comparison says excellent, and the ONNX metrics equal the reference eval app's.
    let cmp: Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("onnx_model/comparison.json")).unwrap()).unwrap();
    assert_eq!(cmp["overall"], "excellent", "{cmp:#}");
    assert_eq!(cmp["dataset"]["consistent"], true);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join(run(RUN)["eval_dir"].as_str().unwrap()).join("pytorch_metrics.json")).unwrap(),
    )
    .unwrap();
    let ours: Value = serde_json::from_str(&std::fs::read_to_string(onnx_eval.join("onnx_metrics.json")).unwrap()).unwrap();
    for k in ["AP", "AP50", "AP75", "AR100"] {
        let (a, b) = (ours[k].as_f64().unwrap(), reference[k].as_f64().unwrap());
        assert!((a - b).abs() < 1e-3, "{k}: onnx {a} vs reference {b}");
    }

    // Nothing changed: nothing runs.
    let again = build_json(&run_dir, &store, &[]);
    assert!(rebuilt(&again).is_empty(), "{again:#}");

    // Deleted and edited outputs come back from the store without recomputation.
    std::fs::remove_file(run_dir.join("onnx_model/model.onnx")).unwrap();
    std::fs::write(onnx_eval.join("onnx_metrics.json"), b"{}").unwrap();
    let restored = build_json(&run_dir, &store, &[]);
    assert!(rebuilt(&restored).is_empty(), "{restored:#}");
    assert!(run_dir.join("onnx_model/model.onnx").is_file());
    let back: Value = serde_json::from_str(&std::fs::read_to_string(onnx_eval.join("onnx_metrics.json")).unwrap()).unwrap();
    assert_eq!(back, ours);

    // A config key that does not affect the model: resolve reruns, its output is identical,
    // so only the summary (which records the config's hash) follows. Early cutoff.
    let config = run_dir.join(".hydra/config.yaml");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{original}\nnotes: an unrelated edit\n")).unwrap();
    let v = build_json(&run_dir, &store, &[]);
    assert_eq!(rebuilt(&v), ["conversion_summary", "resolve_model"], "{v:#}");

    // A config key that matters: everything downstream of the model, not the ground truth.
    std::fs::write(&config, format!("{original}\n").replace("model:\n", "model:\n  box_score_thresh: 0.2\n")).unwrap();
    let v = build_json(&run_dir, &store, &[]);
    assert_eq!(
        rebuilt(&v),
        [
            "compare",
            "conversion_summary",
            "evaluate_onnx",
            "evaluate_pytorch",
            "export_onnx",
            "parity_check",
            "publish_model",
            "resolve_model"
        ],
        "{v:#}"
    );
    std::fs::write(&config, &original).unwrap();

    // A dataset edit: ground truth and evaluations, not the conversion.
    let t2 = tempfile::tempdir().unwrap();
    let ds = t2.path().join(&ds_name);
    copy_dir_all(&eval_dataset(), &ds);
    let mut lines: Vec<String> = std::fs::read_to_string(ds.join("dataset.jsonl")).unwrap().lines().map(str::to_string).collect();
    let last = lines.len() - 1;
    let mut line: Value = serde_json::from_str(&lines[last]).unwrap();
    line["id"] = Value::from(9999);
    lines[last] = line.to_string();
    std::fs::write(ds.join("dataset.jsonl"), lines.join("\n") + "\n").unwrap();
    let ds_args =
        ["build", run_dir.to_str().unwrap(), "--dataset-dir", ds.to_str().unwrap(), "--evaluate-converted-model", "--json", "-j", "1"];
    let o = mkonnx(&ds_args, &store);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rebuilt(&v), ["compare", "evaluate_onnx", "evaluate_pytorch", "ground_truth"], "{v:#}");

    // Image bytes: the same stages, plus the parity check (and the summary that reports it)
    // when it is the sample image.
    let first_image = ds.join(serde_json::from_str::<Value>(&lines[0]).unwrap()["image"].as_str().unwrap());
    let img = image::open(&first_image).unwrap().to_rgb8();
    let mut img = img;
    img.get_pixel_mut(0, 0).0 = [1, 2, 3];
    img.save(&first_image).unwrap();
    let o = mkonnx(&ds_args, &store);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        rebuilt(&v),
        ["compare", "conversion_summary", "evaluate_onnx", "evaluate_pytorch", "ground_truth", "parity_check", "publish_model"],
        "{v:#}"
    );

    // The checkpoint re-saved with other training state but the same weights: the stages that
    // read it rerun; the ONNX model comes out byte-identical, so its evaluation stays fresh.
    let ckpt = run_dir.join("best_model.pth");
    let o = std::process::Command::new(python())
        .args(["-c", "import sys, torch; c = torch.load(sys.argv[1], weights_only=False); c = c if 'model_state_dict' in c else {'model_state_dict': c}; c['epoch'] = 12345; torch.save(c, sys.argv[1])"])
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // The PyTorch evaluation measures its latency again, and a measurement is new bytes, so
    // the comparison follows it.
    let v = build_json(&run_dir, &store, &[]);
    assert_eq!(rebuilt(&v), ["compare", "conversion_summary", "evaluate_pytorch", "export_onnx", "parity_check", "resolve_model"], "{v:#}");
}

fn copy_dir_all(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir_all(&e.path(), &dest.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn the_users_own_evaluation_is_used_for_the_pytorch_side() {
    let t = tempfile::tempdir().unwrap();
    let run_dir = copy_run(RUN, &t.path().join("run"), true);
    let v = build_json(&run_dir, &t.path().join("store"), &[]);
    let o = outcomes(&v);
    assert_eq!(o.get("pytorch_metrics_from_user").map(String::as_str), Some("built"), "{v:#}");
    assert!(!o.contains_key("evaluate_pytorch"));
    let cmp = &v["runs"][0]["comparison"];
    assert_eq!(cmp["overall"], "excellent", "{cmp:#}");
    assert_eq!(cmp["dataset"]["same_ground_truth"], true, "{cmp:#}");
}

#[test]
fn concurrent_builds_build_each_stage_once() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let run_dir = copy_run(RUN, &t.path().join("run"), false);
    let ds = eval_dataset();
    let args = [
        "build",
        run_dir.to_str().unwrap(),
        "--dataset-dir",
        ds.to_str().unwrap(),
        "--evaluate-converted-model",
        "--json",
        "-j",
        "1",
        "--visualizations",
        "2",
    ];
    let spawn = || {
        mkonnx_command_for(&mkonnx_binary(), &store)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{}\n{}", text(&a), text(&b));
    let (va, vb): (Value, Value) = (serde_json::from_slice(&a.stdout).unwrap(), serde_json::from_slice(&b.stdout).unwrap());
    for stage in outcomes(&va).keys() {
        let built = [&va, &vb].iter().filter(|v| outcomes(v)[stage] == "built").count();
        assert_eq!(built, 1, "{stage} built {built} times:\n{va:#}\n{vb:#}");
    }
    let cmp: Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("onnx_model/comparison.json")).unwrap()).unwrap();
    assert_eq!(cmp["overall"], "excellent");
}

#[test]
fn a_build_killed_mid_stage_leaves_the_next_one_correct() {
    let t = tempfile::tempdir().unwrap();
    let run_dir = copy_run(RUN, &t.path().join("run"), false);
    let ds = eval_dataset();
    let args = [
        "build",
        run_dir.to_str().unwrap(),
        "--dataset-dir",
        ds.to_str().unwrap(),
        "--evaluate-converted-model",
        "-j",
        "1",
        "--visualizations",
        "2",
    ];

    // Reference: a clean build in its own store.
    let clean = t.path().join("clean");
    copy_dir_all(&run_dir, &clean);
    let clean_args: Vec<&str> = args.iter().map(|a| if *a == run_dir.to_str().unwrap() { clean.to_str().unwrap() } else { a }).collect();
    let o = mkonnx(&clean_args, &t.path().join("store-clean"));
    assert!(o.status.success(), "{}", text(&o));

    // Kill at several points of a build, then finish it.
    let store = t.path().join("store");
    for delay_ms in [300u64, 1500, 3000] {
        let mut child = mkonnx_command_for(&mkonnx_binary(), &store)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = std::process::Command::new("kill").args(["-9", &child.id().to_string()]).status();
        let _ = child.wait();
    }
    let o = mkonnx(&args, &store);
    assert!(o.status.success(), "{}", text(&o));
    for f in ["onnx_model/model.onnx", "eval_triangles_dataset_small_model_onnx/onnx_predictions.json"] {
        assert_eq!(std::fs::read(run_dir.join(f)).unwrap(), std::fs::read(clean.join(f)).unwrap(), "{f} differs from a clean build");
    }
    // Metrics and comparison: equal but for the latency, a measurement that differs between
    // any two runs.
    for f in ["onnx_model/comparison.json", "eval_triangles_dataset_small_model_onnx/onnx_metrics.json"] {
        let (ours, clean) = (without_latency(&run_dir.join(f)), without_latency(&clean.join(f)));
        assert_eq!(ours, clean, "{f} differs from a clean build");
    }
}

#[test]
fn every_fixture_run_compares_excellent_with_its_own_evaluation() {
    let t = tempfile::tempdir().unwrap();
    for r in all_runs() {
        let name = r["name"].as_str().unwrap();
        let run_dir = copy_run(name, &t.path().join(name), true);
        let v = build_json(&run_dir, &t.path().join("store"), &["--no-parity-check", "--visualizations", "1"]);
        let cmp = &v["runs"][0]["comparison"];
        assert_eq!(cmp["overall"], "excellent", "{name}: {cmp:#}");
        assert_eq!(cmp["dataset"]["consistent"], true, "{name}: {cmp:#}");
    }
}

/// The PyTorch side runs in the `mkonnx-torch` process: when it is missing or dies, the stages
/// that need it fail with a message naming the runner, the other stages still build, and a
/// conversion with `--no-parity-check` never needs it.
#[test]
fn a_missing_or_broken_pytorch_runner_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let run_dir = copy_run(RUN, &t.path().join("run"), false);
    let ds = eval_dataset();
    let image = ds.join("data").read_dir().unwrap().map(|e| e.unwrap().path()).min().unwrap();
    let run = |binary: &Path, runner: Option<&str>, extra: &[&str]| {
        let mut c = mkonnx_command_for(binary, &t.path().join("store"));
        c.args(["build", run_dir.to_str().unwrap(), "--image-input", image.to_str().unwrap()])
            .args(extra)
            .env_remove("MKONNX_TORCH_RUNNER");
        if let Some(r) = runner {
            c.env("MKONNX_TORCH_RUNNER", r);
        }
        c.output().unwrap()
    };
    let o = run(&mkonnx_binary(), Some("/nonexistent/mkonnx-torch"), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("/nonexistent/mkonnx-torch") && out.contains("cannot start it") && !out.contains("panicked"), "{out}");

    let o = run(&mkonnx_binary(), Some("/bin/false"), &["--force"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("/bin/false") && out.contains("exited without an answer"), "{out}");

    // A copy of mkonnx with no runner beside it: says where it looked and how to fix it.
    let lonely = t.path().join("bin/mkonnx");
    std::fs::create_dir_all(lonely.parent().unwrap()).unwrap();
    std::fs::copy(mkonnx_binary(), &lonely).unwrap();
    let o = run(&lonely, None, &["--force"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("`mkonnx-torch` was not found next to") && out.contains("MKONNX_TORCH_RUNNER"), "{out}");
    // Conversion alone does not need the runner.
    let o = run(&lonely, None, &["--no-parity-check"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(run_dir.join("onnx_model/model.onnx").is_file());
}
