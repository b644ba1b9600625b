//! Build script: makes `mkonnx-torch` runnable from any directory without exported variables.
//! torch-sys finds libtorch (from `LIBTORCH_USE_PYTORCH=1` or `LIBTORCH`) but gives the final
//! binary no rpath, so we add one from `DEP_TCH_LIBTORCH_LIB`, and record the folder so the
//! CUDA backend can be loaded from it on demand.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=MKONNX_LIBTORCH_LIB={lib}");
    }
}
