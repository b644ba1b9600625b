//! The `mkonnx` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    mkonnx::cli::main()
}
