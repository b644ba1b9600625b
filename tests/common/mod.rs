//! Shared helpers of the integration tests: the fixtures made by `make fixtures` (real
//! torchvision runs, eager golden outputs, pycocotools metrics) and running the binary.
#![allow(dead_code)]

pub mod runtimes;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fixtures directory (`$MKONNX_FIXTURES`, set by `make test`).
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("MKONNX_FIXTURES")
        .expect("MKONNX_FIXTURES is not set: run the tests with `make test` (it builds the fixtures and sets it)");
    let dir = PathBuf::from(dir);
    assert!(dir.join("COMPLETE").is_file(), "{} is not a complete fixtures directory: run `make fixtures`", dir.display());
    dir
}

/// `runs.json` of the fixtures.
pub fn runs_index() -> Value {
    let text = std::fs::read_to_string(fixtures_dir().join("runs.json")).expect("runs.json");
    serde_json::from_str(&text).expect("runs.json is JSON")
}

/// One fixture run by name.
pub fn run(name: &str) -> Value {
    runs_index()["runs"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no fixture run {name}")).clone()
}

/// Every fixture run.
pub fn all_runs() -> Vec<Value> {
    runs_index()["runs"].as_array().unwrap().clone()
}

/// The evaluation dataset directory.
pub fn eval_dataset() -> PathBuf {
    fixtures_dir().join(runs_index()["datasets"]["eval"].as_str().unwrap())
}

/// Copies a fixture run directory into `dest` (tests never write into the shared cache);
/// `with_user_eval` keeps the reference eval app's `eval_*_best_model_pth/`.
pub fn copy_run(name: &str, dest: &Path, with_user_eval: bool) -> PathBuf {
    let src = fixtures_dir().join(run(name)["run_dir"].as_str().unwrap());
    copy_dir(&src, dest, &|p: &Path| with_user_eval || !p.file_name().unwrap().to_string_lossy().starts_with("eval_"));
    dest.to_path_buf()
}

fn copy_dir(src: &Path, dest: &Path, keep: &dyn Fn(&Path) -> bool) {
    std::fs::create_dir_all(dest).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if !keep(&p) {
            continue;
        }
        let to = dest.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &to, keep);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// The `mkonnx` binary of this build: cargo puts test executables in `target/<profile>/deps/`
/// and the binaries one folder up (`env!("CARGO_BIN_EXE_mkonnx")` would exist only in the
/// mkonnx package's tests, and this module serves the runner crate's too).
pub fn mkonnx_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps").join("mkonnx")
}

/// A command running the mkonnx executable `binary` with a private store and one thread for
/// the runtimes (arguments still to add).
pub fn mkonnx_command_for(binary: &Path, store: &Path) -> Command {
    let mut c = Command::new(binary);
    c.env("MKONNX_STORE", store).env("OMP_NUM_THREADS", "1");
    c
}

/// Runs the mkonnx binary with a private store; one thread for the runtimes.
pub fn mkonnx(args: &[&str], store: &Path) -> Output {
    mkonnx_command_for(&mkonnx_binary(), store).args(args).output().expect("run mkonnx")
}

/// stdout + stderr as text.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The Python of the project environment (for reference checks such as onnx.checker), in the
/// workspace root above whichever package's tests run.
pub fn python() -> PathBuf {
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    package.ancestors().map(|d| d.join(".venv/bin/python")).find(|p| p.exists()).unwrap_or_else(|| package.join(".venv/bin/python"))
}

/// Runs `cmd` to completion (stdout and stderr captured) and returns its output with the
/// child's peak resident memory in bytes, read from the kernel's accounting of that one
/// process (`wait4`), so tests can bound what a crafted input makes mkonnx allocate.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which `Child` cannot see
pub fn output_with_peak_rss(cmd: &mut Command) -> (Output, u64) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).map(|_| v)
    });
    let mut stderr = Vec::new();
    err.read_to_end(&mut stderr).expect("read stderr");
    let stdout = out_reader.join().expect("stdout reader").expect("read stdout");
    let mut status = 0;
    // SAFETY: plain FFI; `rusage` is a C struct for which all-zero bytes are valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waits for our own child, which `Child` has not reaped (we never call wait on it).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let peak = u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024; // kilobytes on Linux
    (Output { status: std::process::ExitStatus::from_raw(status), stdout, stderr }, peak)
}

/// The resolved detector of a fixture run (checkpoint read natively), checked to be the
/// architecture the fixture was trained as.
pub fn detector(run: &Value) -> mkonnx::model::Detector {
    use mkonnx::data::run_dir::RunDir;
    let root = fixtures_dir();
    let checkpoint = root.join(run["checkpoint"].as_str().unwrap());
    let det = mkonnx::model::Detector::load_run(&RunDir::locate(&root.join(run["run_dir"].as_str().unwrap()), Some(&checkpoint)).unwrap())
        .unwrap();
    assert_eq!(det.arch.constructor(), run["architecture"].as_str().unwrap(), "resolved architecture of {}", run["name"]);
    det
}

/// The golden eager outputs of `run` with their images, in file order.
pub fn golden(run: &Value) -> Vec<(Value, PathBuf)> {
    let dir = fixtures_dir().join(run["golden_dir"].as_str().unwrap());
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let g: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
            let image = eval_dataset().join(g["image"].as_str().unwrap());
            (g, image)
        })
        .collect()
}

/// A golden file's detections.
pub fn golden_detections(g: &Value) -> mkonnx::runtime::Detections {
    let f = |v: &Value| v.as_f64().unwrap() as f32;
    mkonnx::runtime::Detections {
        boxes: g["boxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let b = b.as_array().unwrap();
                [f(&b[0]), f(&b[1]), f(&b[2]), f(&b[3])]
            })
            .collect(),
        scores: g["scores"].as_array().unwrap().iter().map(f).collect(),
        labels: g["labels"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect(),
    }
}

/// The sum of an image's 0..255 pixel values (to check a golden was made from this image).
pub fn rgb_sum(img: &mkonnx::runtime::RgbImage) -> u64 {
    img.chw.iter().map(|v| (v * 255.0).round() as u64).sum()
}
pub mod moto;

/// A metrics or comparison file with its latency fields removed (after checking they exist):
/// latency is a measurement, new bytes at every run, while everything else must be equal.
pub fn without_latency(path: &Path) -> Value {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let removed = v.as_object_mut().unwrap().remove("latency");
    assert!(removed.is_some_and(|l| !l.is_null()), "{} has no latency", path.display());
    v
}

/// Whether a run output is a metrics or comparison file, which carries a latency measurement.
pub fn has_latency(relative_path: &str) -> bool {
    relative_path.ends_with("_metrics.json") || relative_path.ends_with("comparison.json")
}
