//! Shared helpers of the integration tests: the fixtures made by `make fixtures` (real
//! torchvision runs, eager golden outputs, pycocotools metrics) and running the binary.
#![allow(dead_code)]

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
// The child is reaped by `wait4`, which clippy does not know.
#[allow(clippy::zombie_processes)]
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
