//! Build script: makes the `mkonnx` binary runnable from any directory without exported
//! variables. ONNX Runtime: `ort` is built with `load-dynamic`; we record the absolute path of
//! the `libonnxruntime.so` that the build found (`ORT_DYLIB_PATH`, else the onnxruntime wheel
//! of the Python on PATH) so the binary can load it at run time. (libtorch is the runner
//! crate's business: torch/build.rs.) It also records the build's identity (sources and
//! runtime versions), which enters every stage key: see [`build_identity`].

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ORT_DYLIB_PATH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    println!("cargo:rerun-if-env-changed=LIBTORCH");

    let ort = onnxruntime_dylib();
    match &ort {
        Some(path) => println!("cargo:rustc-env=MKONNX_ORT_DYLIB={}", path.display()),
        None => {
            println!("cargo:warning=libonnxruntime.so not found: set ORT_DYLIB_PATH or install the onnxruntime wheel (make setup); mkonnx will need ORT_DYLIB_PATH at run time");
            println!("cargo:rustc-env=MKONNX_ORT_DYLIB=");
        }
    }
    println!("cargo:rustc-env=MKONNX_BUILD_IDENTITY={}", build_identity(ort.as_deref()));
}

/// The sources whose content decides what mkonnx and its runner compute, relative to the
/// workspace root. Tests, benches and docs are left out: they change no output.
const IDENTITY_SOURCES: &[&str] = &["Cargo.toml", "Cargo.lock", "build.rs", "src", "torch/Cargo.toml", "torch/build.rs", "torch/src"];

/// `mkonnx <version> (src <hash>, onnxruntime <v>, libtorch <v>)`: enters every stage key, so a
/// build from other sources or against other runtimes never reuses this one's results (as
/// cargo hashes the compiler into every fingerprint). The hash covers relative paths and
/// contents only, so two machines building the same sources share a store.
fn build_identity(ort: Option<&Path>) -> String {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for source in IDENTITY_SOURCES {
        println!("cargo:rerun-if-changed={source}");
        collect_files(&root, &root.join(source), &mut files);
    }
    files.sort();
    let mut hasher = blake3::Hasher::new_derive_key("mkonnx.build-identity.v1");
    for (relative, path) in &files {
        let bytes = std::fs::read(path).unwrap_or_default();
        hasher.update(&(relative.len() as u64).to_le_bytes());
        hasher.update(relative.as_bytes());
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    let source = hasher.finalize().to_hex();
    let ort_version = ort
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libonnxruntime.so."))
        .unwrap_or("unknown")
        .to_string();
    let torch_version = libtorch_version().unwrap_or_else(|| "unknown".into());
    format!(
        "mkonnx {} (src {}, onnxruntime {ort_version}, libtorch {torch_version})",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default(),
        &source[..16]
    )
}

/// Every file under `path` (or `path` itself), as (path relative to `root` with `/`, path).
fn collect_files(root: &Path, path: &Path, out: &mut Vec<(String, PathBuf)>) {
    if path.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else { return };
        for entry in entries.flatten() {
            collect_files(root, &entry.path(), out);
        }
    } else if path.is_file() {
        let relative = path.strip_prefix(root).unwrap_or(path);
        let relative = relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
        out.push((relative, path.to_path_buf()));
    }
}

/// libtorch's version from the folder tch builds against (`$LIBTORCH/version.py` of a
/// PyTorch wheel, or `build-version` of a libtorch download).
fn libtorch_version() -> Option<String> {
    let dir = PathBuf::from(std::env::var_os("LIBTORCH")?);
    if let Ok(text) = std::fs::read_to_string(dir.join("build-version")) {
        return Some(text.trim().to_string());
    }
    let text = std::fs::read_to_string(dir.join("version.py")).ok()?;
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    Some(line.split(['\'', '"']).nth(1)?.to_string())
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
