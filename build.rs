//! Build script: makes the `mkonnx` binary runnable from any directory without exported
//! variables. ONNX Runtime: `ort` is built with `load-dynamic`; we record the absolute path of
//! the `libonnxruntime.so` that the build found (`ORT_DYLIB_PATH`, else the onnxruntime wheel
//! of the Python on PATH) so the binary can load it at run time. (libtorch is the runner
//! crate's business: torch/build.rs.)

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ORT_DYLIB_PATH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");

    match onnxruntime_dylib() {
        Some(path) => println!("cargo:rustc-env=MKONNX_ORT_DYLIB={}", path.display()),
        None => {
            println!("cargo:warning=libonnxruntime.so not found: set ORT_DYLIB_PATH or install the onnxruntime wheel (make setup); mkonnx will need ORT_DYLIB_PATH at run time");
            println!("cargo:rustc-env=MKONNX_ORT_DYLIB=");
        }
    }
}

/// Where the ONNX Runtime shared library is: `ORT_DYLIB_PATH`, else the onnxruntime wheel.
fn onnxruntime_dylib() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(path));
    }
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
    let script = "import glob, os, onnxruntime; d = os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'); print(sorted(glob.glob(os.path.join(d, 'libonnxruntime.so*')))[-1])";
    let out = Command::new(python).args(["-c", script]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    path.canonicalize().ok()
}
