//! A fleet of runs that differ the way real runs do (architectures, class names in different
//! places, class counts, broken runs) built in one command: no run's trouble stops another,
//! each failure says which file is wrong, every good run comes out exactly as if built
//! alone, and the fleet report lists every run. Also: a build of mkonnx from other sources
//! never reuses this build's results, and a runner from another build is refused.

mod common;
use common::{copy_run, eval_dataset, has_latency, mkonnx, mkonnx_binary, mkonnx_command_for, python, text, without_latency};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A run of the fleet: its directory and, for a bad one, what its error must mention.
struct FleetRun {
    dir: PathBuf,
    error: Option<String>,
}

/// Reads, edits and writes a run's `.hydra/config.yaml`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_yaml::Mapping)) {
    let path = dir.join(".hydra/config.yaml");
    let mut cfg: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(cfg.as_mapping_mut().unwrap());
    std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
}

fn yaml_names(names: &[&str]) -> serde_yaml::Value {
    serde_yaml::Value::Sequence(names.iter().map(|n| serde_yaml::Value::from(*n)).collect())
}

/// Moves the config's class names from wherever they are to `section.class_names` (or the
/// top level when `section` is empty).
fn move_class_names(dir: &Path, section: &str, names: &[&str]) {
    edit_config(dir, |m| {
        for s in ["dataset", "model", "data"] {
            if let Some(sub) = m.get_mut(s).and_then(|v| v.as_mapping_mut()) {
                sub.remove("class_names");
            }
        }
        if section.is_empty() {
            m.insert("class_names".into(), yaml_names(names));
        } else {
            let sub = m.entry(section.into()).or_insert_with(|| serde_yaml::Mapping::new().into());
            sub.as_mapping_mut().unwrap().insert("class_names".into(), yaml_names(names));
        }
    });
}

/// The first `n` images of the evaluation dataset, as a dataset of their own.
fn small_dataset(dest: &Path, n: usize) -> PathBuf {
    let src = eval_dataset();
    let ds = dest.join("triangles_dataset_small");
    std::fs::create_dir_all(ds.join("data")).unwrap();
    let index = std::fs::read_to_string(src.join("dataset.jsonl")).unwrap();
    let lines: Vec<&str> = index.lines().filter(|l| !l.trim().is_empty()).take(n).collect();
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let image = v["image"].as_str().unwrap();
        std::fs::copy(src.join(image), ds.join(image)).unwrap();
    }
    std::fs::write(ds.join("dataset.jsonl"), lines.join("\n") + "\n").unwrap();
    ds
}

/// Widens a 2-class checkpoint's predictor to 5 classes (+ background) with real
/// `torch.save`, as a run trained on 5 classes would have it.
fn widen_to_five_classes(checkpoint: &Path) {
    let script = r#"
import sys, torch
path = sys.argv[1]
ck = torch.load(path, map_location="cpu", weights_only=False)
sd = ck["model_state_dict"] if "model_state_dict" in ck else ck
g = torch.Generator().manual_seed(0)
for name, per in (("roi_heads.box_predictor.cls_score", 1), ("roi_heads.box_predictor.bbox_pred", 4)):
    w, b = sd[name + ".weight"], sd[name + ".bias"]
    sd[name + ".weight"] = torch.cat([w, w[-per:].repeat(3, 1) + 0.01 * torch.randn(3 * per, w.shape[1], generator=g)])
    sd[name + ".bias"] = torch.cat([b, b[-per:].repeat(3)])
torch.save(ck, path)
"#;
    let o = std::process::Command::new(python()).args(["-c", script]).arg(checkpoint).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

/// Makes every run of the fleet under `root/<name>`; `root` differs between the fleet build
/// and the builds of each run alone, the names do not.
fn make_fleet(root: &Path) -> BTreeMap<&'static str, FleetRun> {
    let mut fleet = BTreeMap::new();
    let mut good = |name: &'static str, fixture: &str, setup: &dyn Fn(&Path)| {
        let dir = copy_run(fixture, &root.join(name), false);
        setup(&dir);
        fleet.insert(name, FleetRun { dir, error: None });
    };
    // Class names where the fixtures put them (dataset.class_names, model.class_names) and
    // where other training repos do (top level, data.class_names).
    good("mobilenet_320", "mobilenet_v3_large_320_fpn", &|_| {});
    good("mobilenet", "mobilenet_v3_large_fpn", &|_| {});
    good("resnet50", "resnet50_fpn", &|d| move_class_names(d, "", &["up", "down"]));
    good("resnet50_v2", "resnet50_fpn_v2", &|d| move_class_names(d, "data", &["up", "down"]));
    // The same classes named differently: the case that used to abort the whole build.
    good("mobilenet_320_apex", "mobilenet_v3_large_320_fpn", &|d| move_class_names(d, "dataset", &["apex_up", "down"]));
    good("mobilenet_320_five", "mobilenet_v3_large_320_fpn", &|d| {
        widen_to_five_classes(&d.join("best_model.pth"));
        move_class_names(d, "dataset", &["up", "down", "left", "right", "none"]);
        edit_config(d, |m| {
            m.get_mut("model").unwrap().as_mapping_mut().unwrap().insert("num_classes".into(), 6.into());
        });
    });

    let broken = copy_run("mobilenet_v3_large_320_fpn", &root.join("broken_config"), false);
    std::fs::write(broken.join(".hydra/config.yaml"), "model: [broken\n").unwrap();
    fleet.insert("broken_config", FleetRun { error: Some(broken.join(".hydra/config.yaml").display().to_string()), dir: broken });

    let missing = copy_run("mobilenet_v3_large_320_fpn", &root.join("missing_checkpoint"), false);
    std::fs::remove_file(missing.join("best_model.pth")).unwrap();
    let error = format!("Checkpoint not found: {}", missing.join("best_model.pth").display());
    fleet.insert("missing_checkpoint", FleetRun { dir: missing, error: Some(error) });

    let truncated = copy_run("resnet50_fpn", &root.join("truncated_checkpoint"), false);
    let ckpt = truncated.join("best_model.pth");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() / 2]).unwrap();
    fleet.insert("truncated_checkpoint", FleetRun { error: Some(ckpt.display().to_string()), dir: truncated });
    fleet
}

/// The evaluation dataset's first image (the parity sample of a dataset build).
fn first_image() -> PathBuf {
    let index = std::fs::read_to_string(eval_dataset().join("dataset.jsonl")).unwrap();
    let first: Value = serde_json::from_str(index.lines().next().unwrap()).unwrap();
    eval_dataset().join(first["image"].as_str().unwrap())
}

/// Every file under `dir` except the run's own inputs, by relative path, with its bytes.
fn outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "best_model.pth" || rel.starts_with(".hydra") {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn build_args<'a>(runs: &'a [String], dataset: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["build"];
    args.extend(runs.iter().map(String::as_str));
    args.extend(["--dataset-dir", dataset, "--evaluate-converted-model"]);
    args.extend(extra);
    args
}

#[test]
fn a_fleet_builds_in_one_command_and_each_run_as_if_alone() {
    let t = tempfile::tempdir().unwrap();
    let dataset = small_dataset(t.path(), 3);
    let ds = dataset.to_str().unwrap();
    let fleet = make_fleet(&t.path().join("fleet"));
    let runs: Vec<String> = fleet.values().map(|r| r.dir.display().to_string()).collect();
    let store = t.path().join("store");

    let o = mkonnx(&build_args(&runs, ds, &["-j", "2"]), &store);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert_eq!(o.status.code(), Some(1), "{stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for (name, r) in &fleet {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&r.dir.display().to_string()))
            .unwrap_or_else(|| panic!("{name} not in the report:\n{stdout}"));
        match &r.error {
            None => {
                assert!(line.contains(" ok "), "{name}: {line}\n{stdout}\n{stderr}");
                assert!(line.contains("fasterrcnn_"), "{line}");
                assert!(r.dir.join("onnx_model/model.onnx").is_file(), "{name}");
                let cmp: Value = serde_json::from_slice(&std::fs::read(r.dir.join("onnx_model/comparison.json")).unwrap()).unwrap();
                assert_eq!(cmp["available"], true, "{name}: {cmp}");
            }
            Some(error) => {
                assert!(line.contains("FAILED"), "{name}: {line}");
                assert!(
                    stderr.lines().any(|l| l.starts_with("Error: ") && l.contains(error.as_str())),
                    "{name}: no error naming {error} on stderr:\n{stderr}"
                );
                assert!(!r.dir.join("onnx_model/model.onnx").exists(), "{name}");
            }
        }
    }
    assert!(stdout.contains("6 of 9 run(s) ok"), "{stdout}");
    // Five classes: its ground truth has five categories, the others two.
    let gt = |name: &str| -> Value {
        let dir = fleet[name].dir.join("eval_triangles_dataset_small_model_onnx/ground_truth_coco.json");
        serde_json::from_slice(&std::fs::read(dir).unwrap()).unwrap()
    };
    assert_eq!(gt("mobilenet_320_five")["categories"].as_array().unwrap().len(), 5);
    assert_eq!(gt("mobilenet_320_apex")["categories"][0]["name"], "apex_up");
    assert_eq!(gt("resnet50")["categories"][0]["name"], "up");

    // The same again with --quiet: nothing to build, no progress, the errors all the same.
    let o = mkonnx(&build_args(&runs, ds, &["-j", "2", "--quiet"]), &store);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert_eq!(o.status.code(), Some(1));
    assert!(!stderr.contains("running") && !stderr.contains("built "), "{stderr}");
    for r in fleet.values().filter_map(|r| r.error.as_ref()) {
        assert!(stderr.contains(r.as_str()), "--quiet dropped the error naming {r}:\n{stderr}");
    }
    assert!(stdout.contains("6 of 9 run(s) ok"), "{stdout}");

    // The report, from the store alone, as JSON: the rows of the build.
    let mut args = vec!["report", "--format", "json"];
    args.extend(runs.iter().map(String::as_str));
    let o = mkonnx(&args, &store);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["runs"].as_array().unwrap();
    assert_eq!(rows.len(), 9);
    for row in rows {
        let ok = row["result"] == "ok";
        let name = Path::new(row["run"].as_str().unwrap()).file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(ok, fleet[name.as_str()].error.is_none(), "{row}");
        if ok {
            assert!(row["onnx_ap"].as_f64().is_some() && row["pytorch_ap"].as_f64().is_some() && row["parity"] == "OK", "{row}");
        } else {
            assert!(row["error"].as_str().is_some_and(|e| !e.is_empty()), "{row}");
        }
    }

    // Each good run built alone, in a store of its own, with the same options, gives the
    // same bytes. (The same -j: it sets the threads per stage, and the runtimes' last bits
    // depend on the thread count, which is why it is in those stages' keys.)
    let alone = make_fleet(&t.path().join("alone"));
    for (name, r) in alone.iter().filter(|(_, r)| r.error.is_none()) {
        let o = mkonnx(&build_args(&[r.dir.display().to_string()], ds, &["-j", "2"]), &t.path().join(format!("store_{name}")));
        assert!(o.status.success(), "{name}: {}", text(&o));
        let (fleet_out, alone_out) = (outputs(&fleet[name].dir), outputs(&r.dir));
        assert_eq!(fleet_out.keys().collect::<Vec<_>>(), alone_out.keys().collect::<Vec<_>>(), "{name}");
        for (file, bytes) in &fleet_out {
            if has_latency(file) {
                let (fleet_v, alone_v) = (without_latency(&fleet[name].dir.join(file)), without_latency(&r.dir.join(file)));
                assert_eq!(fleet_v, alone_v, "{name}: {file} differs from the run built alone (latency aside)");
            } else {
                assert!(bytes == &alone_out[file], "{name}: {file} differs from the run built alone");
            }
        }
    }
}

#[test]
fn a_build_from_other_sources_reruns_the_export() {
    use mkonnx::engine::{BuildOptions, Engine, Outcome};
    use mkonnx::stages::{plan, BuildRequest, Device};
    let t = tempfile::tempdir().unwrap();
    let dir = copy_run("mobilenet_v3_large_320_fpn", &t.path().join("run"), false);
    let req = BuildRequest {
        runs: vec![mkonnx::data::run_dir::RunDir::locate(&dir, None).unwrap()],
        dataset: None,
        image_input: None,
        evaluate: false,
        parity: false,
        keep_failed_parity: false,
        device: Device::Cpu,
        threads: 1,
        visualizations: 0,
        vis_score_thresh: 0.3,
        int8: None,
    };
    let (graph, planned) = plan(&req);
    let export = graph.find_stage("export_onnx")[0];
    let build = |identity: &str| {
        let engine = Engine::open(&t.path().join("store"), identity).unwrap();
        engine.build(&graph, &BuildOptions::default()).unwrap()
    };
    let ours = mkonnx::build_identity();
    assert!(ours.starts_with("mkonnx ") && ours.contains("(src "), "{ours}");
    assert!(matches!(build(ours).get(export).outcome, Outcome::Built { .. }));
    assert!(matches!(build(ours).get(export).outcome, Outcome::Fresh));
    // Same version number, other exporter sources: nothing may be reused.
    let other = ours.replace("(src ", "(src 0");
    let engine = Engine::open(&t.path().join("store"), other.as_str()).unwrap();
    let status = engine.status(&graph, &mkonnx::engine::Force::Nothing).unwrap();
    assert!(status.to_string().contains("mkonnx version changed"), "{status}");
    let r = build(&other);
    assert!(matches!(r.get(export).outcome, Outcome::Built { .. }), "{r}");
    assert!(r.ok() && planned[0].error.is_none(), "{r}");
}

#[test]
fn a_runner_from_another_build_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = copy_run("mobilenet_v3_large_320_fpn", &t.path().join("run"), false);
    let image = first_image();
    for (reply, expect) in [
        (r#"{"ready":{"identity":"mkonnx 0.1.0 (src 0000000000000000, onnxruntime 1.31.1, libtorch 2.13.0)"}}"#, "src 0000000000000000"),
        (r#""ready""#, "does not speak this protocol"),
    ] {
        let fake = t.path().join("fake-runner");
        std::fs::write(&fake, format!("#!/bin/sh\nread line\necho '{reply}'\ncat >/dev/null\n")).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let o = mkonnx_command_for(&mkonnx_binary(), &t.path().join("store"))
            .env("MKONNX_TORCH_RUNNER", &fake)
            .args(["build", dir.to_str().unwrap(), "--image-input", image.to_str().unwrap()])
            .output()
            .unwrap();
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(out.contains("comes from another build") && out.contains(expect) && out.contains(mkonnx::build_identity()), "{out}");
        assert!(!dir.join("onnx_model/model.onnx").exists(), "a model whose parity was never checked was published");
    }
}

/// A stand-in runner of this very build that sees nothing in any image: the parity check of
/// every real model then fails.
fn blind_runner(dir: &Path) -> PathBuf {
    let fake = dir.join("blind-runner");
    use mkonnx::runtime::pytorch::Reply;
    let ready = serde_json::to_string(&Reply::Ready { identity: mkonnx::build_identity().to_string() }).unwrap();
    let nothing = Reply::Detections { detections: vec![mkonnx::runtime::Detections::default()], compute_seconds: 0.0 };
    let nothing = serde_json::to_string(&nothing).unwrap();
    let script = format!("#!/bin/sh\nread setup\necho '{ready}'\nwhile read header; do echo '{nothing}'; done\n");
    std::fs::write(&fake, script).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fake
}

#[test]
fn a_model_that_fails_its_parity_check_is_not_published() {
    let t = tempfile::tempdir().unwrap();
    let dir = copy_run("mobilenet_v3_large_320_fpn", &t.path().join("run"), false);
    let image = first_image();
    let store = t.path().join("store");
    let build = |runner: Option<&Path>, extra: &[&str]| {
        let mut c = mkonnx_command_for(&mkonnx_binary(), &store);
        if let Some(r) = runner {
            c.env("MKONNX_TORCH_RUNNER", r);
        }
        c.args(["build", dir.to_str().unwrap(), "--image-input", image.to_str().unwrap(), "--json"]).args(extra);
        // The INT8 model follows the float model's fate.
        c.args(["--quantize", "int8", "--calibration-images", "2", "--calibration-dir", eval_dataset().join("data").to_str().unwrap()]);
        c.output().unwrap()
    };
    let model = dir.join("onnx_model/model.onnx");
    let int8 = dir.join("onnx_model/model.int8.onnx");
    let summary = || std::fs::read_to_string(dir.join("onnx_model/conversion_summary.txt")).unwrap();

    // Published by a good build, then withdrawn when the check fails.
    let o = build(None, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(model.is_file() && int8.is_file());
    let blind = blind_runner(t.path());
    let o = build(Some(&blind), &["--force"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("parity FAILED") && stderr.contains("not published"), "{stderr}");
    assert!(!model.exists(), "a model that disagrees with PyTorch is still where deployments pick it up");
    assert!(!int8.exists(), "the INT8 model of a float model that disagrees with PyTorch is still published");
    assert!(summary().contains("NOT published"), "{}", summary());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["runs"][0]["result"], "failed");
    assert_eq!(v["runs"][0]["parity"], "FAILED");

    // --keep-failed-parity publishes it, says so, and the run succeeds.
    let o = build(Some(&blind), &["--keep-failed-parity"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(model.is_file() && int8.is_file());
    assert!(summary().contains("published anyway"), "{}", summary());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["runs"][0]["parity"], "FAILED (kept)");
}

/// `(state, parent pid)` of a process, from `/proc/<pid>/stat`; `None` once it is gone.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// The pid of a live `mkonnx-torch` whose parent is `parent`.
fn runner_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).find(|&pid| {
        proc_state(pid).is_some_and(|(state, ppid)| ppid == parent && state != 'Z')
            && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "mkonnx-torch")
    })
}

#[test]
fn nothing_is_written_outside_the_store_and_the_runner_dies_with_mkonnx() {
    let t = tempfile::tempdir().unwrap();
    let dir = copy_run("mobilenet_v3_large_320_fpn", &t.path().join("run"), false);
    let home = t.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let ds = eval_dataset();
    let build = || {
        let mut c = mkonnx_command_for(&mkonnx_binary(), &t.path().join("store"));
        c.env("HOME", &home).env_remove("XDG_CACHE_HOME").env_remove("ORT_DISABLE_TELEMETRY");
        c.args(["build", dir.to_str().unwrap(), "--dataset-dir", ds.to_str().unwrap(), "--evaluate-converted-model", "--quiet"]);
        c
    };
    // ONNX Runtime and libtorch both ran: nothing under $HOME (ONNX Runtime's telemetry
    // would write ~/.cache/Microsoft/DeveloperTools/.onnxruntime).
    let o = build().output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let written: Vec<_> = std::fs::read_dir(&home).unwrap().collect();
    assert!(written.is_empty(), "{written:?}");

    // kill -9 mkonnx while its runner evaluates the dataset: the runner does not linger.
    let mut child = build().arg("--force").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    // A runner that has been up for a second (past loading libtorch, into its work).
    let started = std::time::Instant::now();
    let runner = loop {
        if let Some(pid) = runner_of(child.id()) {
            std::thread::sleep(std::time::Duration::from_secs(1));
            if runner_of(child.id()) == Some(pid) {
                break pid;
            }
        }
        assert!(started.elapsed().as_secs() < 120, "no runner stayed up for a second");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    // Stopped, the runner cannot notice its closed pipe: only the kernel can end it.
    // SAFETY: signals to processes this test started.
    unsafe { libc::kill(runner as i32, libc::SIGSTOP) };
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = std::time::Instant::now();
    while proc_state(runner).is_some_and(|(state, _)| state != 'Z') {
        if killed.elapsed().as_secs() >= 10 {
            unsafe { libc::kill(runner as i32, libc::SIGKILL) };
            panic!("mkonnx-torch {runner} outlived its killed parent");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
