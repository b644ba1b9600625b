//! The PyTorch model, run by mkonnx's libtorch runner `mkonnx-torch` in a child process.
//!
//! Why a separate process: loading libtorch costs every process that links it ~0.3 s before
//! `main` (the dynamic loader maps ~1 GB and runs libtorch's operator registrations). Most
//! `mkonnx` invocations never run the PyTorch model — a no-op rebuild, `status`, a conversion
//! with `--no-parity-check`, `coco-eval` — so the `mkonnx` binary does not link libtorch and
//! the stages that need the PyTorch model (parity check, PyTorch evaluation) start the runner,
//! which lives in the workspace crate `torch/` next to this one.
//!
//! The protocol on the runner's stdin/stdout, one JSON message per line:
//! 1. mkonnx sends a [`RunnerSetup`] (checkpoint path, architecture, hyperparameters, device,
//!    threads); the runner reads the checkpoint with mkonnx's own reader and answers
//!    [`Reply::Ready`] (with its build identity, which must equal mkonnx's) or [`Reply::Error`].
//! 2. For each batch, mkonnx sends a [`BatchHeader`] line followed by the batch's float32
//!    data (`len·3·height·width` values, native byte order: both ends are one machine); the
//!    runner answers [`Reply::Detections`] (one per image) or [`Reply::Error`].
//! 3. mkonnx closes stdin; the runner exits.
//!
//! Floats travel as JSON numbers written with shortest round-trip formatting, so detections
//! arrive bit for bit as libtorch computed them.

use super::{Detections, ImageBatch};
use crate::model::{Architecture, DetectorParams};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

/// File name of the runner binary, installed next to `mkonnx`.
pub const RUNNER_BINARY: &str = "mkonnx-torch";

/// Environment variable that points at the runner binary, overriding the lookup next to
/// `mkonnx`.
pub const RUNNER_ENV: &str = "MKONNX_TORCH_RUNNER";

/// Which device runs the PyTorch model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CPU.
    Cpu,
    /// First CUDA GPU.
    Cuda,
}

impl Device {
    /// The name libtorch and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// Errors of the PyTorch runner, as seen from mkonnx.
#[derive(Debug, thiserror::Error)]
pub enum PytorchError {
    /// The runner binary is not where mkonnx looks for it.
    #[error("the PyTorch runner `{RUNNER_BINARY}` was not found next to {exe}: build it with `make build` (cargo build --release --workspace), or set {RUNNER_ENV} to its path")]
    RunnerMissing {
        /// The running mkonnx executable.
        exe: PathBuf,
    },
    /// The runner could not be started or talked to.
    #[error("PyTorch runner {runner}: {message}")]
    Io {
        /// The runner binary.
        runner: PathBuf,
        /// What failed.
        message: String,
    },
    /// The runner was built from other sources than this mkonnx.
    #[error(
        "the PyTorch runner {} comes from another build ({found}), but this mkonnx is {ours}: \
         build both from the same sources (`make build`, or cargo build --release --workspace), \
         or point {RUNNER_ENV} at the matching runner",
        runner.display()
    )]
    OtherBuild {
        /// The runner binary.
        runner: PathBuf,
        /// What it reported.
        found: String,
        /// This mkonnx's identity.
        ours: &'static str,
    },
    /// The runner reported an error (bad weights, no GPU, a libtorch failure).
    #[error("{0}")]
    Runner(String),
}

/// First message to the runner: which model to load, and how to run it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunnerSetup {
    /// The `torch.save` checkpoint the weights come from.
    pub checkpoint: PathBuf,
    /// torchvision constructor.
    pub arch: Architecture,
    /// Inference hyperparameters.
    pub params: DetectorParams,
    /// Where the network runs.
    pub device: Device,
    /// libtorch intra-op threads.
    pub threads: usize,
}

/// Announces one batch; its float32 data follows the line.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchHeader {
    /// Images in the batch.
    pub len: usize,
    /// Height of every image.
    pub height: usize,
    /// Width of every image.
    pub width: usize,
}

impl BatchHeader {
    /// Number of float32 values that follow the header.
    pub fn values(&self) -> usize {
        self.len * 3 * self.height * self.width
    }
}

/// The runner's answers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The model is loaded; `identity` is the runner's [`crate::build_identity`], which
    /// must equal mkonnx's: results of one build must not mix with another's.
    Ready {
        /// The runner's build identity.
        identity: String,
    },
    /// One entry per image of the batch, and how long the model took on it inside the
    /// runner (libtorch's compute only: not the pipe, the JSON, or the image conversion),
    /// which is what latency reports for PyTorch.
    Detections {
        /// One entry per image.
        detections: Vec<Detections>,
        /// Seconds the model ran on the batch.
        compute_seconds: f64,
    },
    /// What went wrong; the runner stays usable for the next batch when it can.
    Error(String),
}

/// Writes one message as a JSON line.
pub fn write_message<T: Serialize>(out: &mut impl Write, message: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, message)?;
    out.write_all(b"\n")
}

/// Reads one JSON-line message; `None` at end of input.
pub fn read_message<T: for<'de> Deserialize<'de>>(input: &mut impl BufRead) -> std::io::Result<Option<T>> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Reads the float32 data announced by `header`.
pub fn read_batch_data(input: &mut impl Read, header: &BatchHeader) -> std::io::Result<Vec<f32>> {
    let mut data = vec![0f32; header.values()];
    input.read_exact(bytemuck::cast_slice_mut(&mut data))?;
    Ok(data)
}

/// Where the runner binary is: `$MKONNX_TORCH_RUNNER`, else next to the running executable
/// (or one folder up, where cargo puts test and bench executables).
pub fn runner_path() -> Result<PathBuf, PytorchError> {
    if let Some(path) = std::env::var_os(RUNNER_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("mkonnx"));
    let dir = exe.parent().unwrap_or(Path::new("."));
    [dir.join(RUNNER_BINARY), dir.join("..").join(RUNNER_BINARY)]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(PytorchError::RunnerMissing { exe })
}

/// Fails unless libtorch can run on `device` (for `--device cuda`: fails before any work when
/// no GPU is usable).
pub fn check_device(device: Device) -> Result<(), PytorchError> {
    let runner = runner_path()?;
    let out = Command::new(&runner)
        .args(["check-device", device.name()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PytorchError::Io { runner: runner.clone(), message: format!("cannot start it: {e}") })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(PytorchError::Runner(stderr.trim().trim_start_matches("Error: ").to_string()))
}

/// A running `mkonnx-torch` with one model loaded.
pub struct PytorchRunner {
    runner: PathBuf,
    child: Child,
    input: Option<BufWriter<ChildStdin>>,
    output: BufReader<ChildStdout>,
    /// What the runner wrote to stderr, for error messages.
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl PytorchRunner {
    /// Starts the runner and loads the model of `setup`.
    pub fn start(setup: &RunnerSetup) -> Result<PytorchRunner, PytorchError> {
        let runner = runner_path()?;
        let mut child = Command::new(&runner)
            .arg("serve")
            // The runner dies with us (see mkonnx-torch's `die_with_parent`).
            .env("MKONNX_PARENT_PID", std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| PytorchError::Io { runner: runner.clone(), message: format!("cannot start it: {e}") })?;
        let (Some(input), Some(output), Some(mut err_pipe)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
            unreachable!("all three pipes were requested")
        };
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err_pipe.read_to_string(&mut text);
            if let Ok(mut s) = sink.lock() {
                s.push_str(&text);
            }
        });
        let mut this = PytorchRunner {
            runner,
            child,
            input: Some(BufWriter::new(input)),
            output: BufReader::new(output),
            stderr,
            stderr_reader: Some(stderr_reader),
        };
        this.send(|w| write_message(w, setup))?;
        let other_build =
            |runner: &Path, found: String| PytorchError::OtherBuild { runner: runner.to_path_buf(), found, ours: crate::build_identity() };
        match this.receive() {
            Ok(Reply::Ready { identity }) if identity == crate::build_identity() => Ok(this),
            Ok(Reply::Ready { identity }) => Err(other_build(&this.runner, identity)),
            Ok(Reply::Error(e)) => Err(PytorchError::Runner(e)),
            Ok(other) => Err(this.protocol_error(&format!("expected `ready`, got {other:?}"))),
            // A runner that answers in another dialect is from another build.
            Err(PytorchError::Io { message, .. }) if message.starts_with("unexpected answer") => {
                Err(other_build(&this.runner, format!("one that does not speak this protocol: {message}")))
            }
            Err(e) => Err(e),
        }
    }

    /// `model(images)` for one batch: one [`Detections`] per image, at the original size.
    pub fn detect(&mut self, batch: &ImageBatch) -> Result<Vec<Detections>, PytorchError> {
        Ok(self.detect_timed(batch)?.0)
    }

    /// [`Self::detect`], with the time the model took inside the runner.
    pub fn detect_timed(&mut self, batch: &ImageBatch) -> Result<(Vec<Detections>, std::time::Duration), PytorchError> {
        let header = BatchHeader { len: batch.len, height: batch.height, width: batch.width };
        if batch.data.len() != header.values() {
            return Err(PytorchError::Runner(format!(
                "a batch of {} {}x{} images needs {} values, got {}",
                batch.len,
                batch.width,
                batch.height,
                header.values(),
                batch.data.len()
            )));
        }
        self.send(|w| {
            write_message(w, &header)?;
            w.write_all(bytemuck::cast_slice(&batch.data))
        })?;
        match self.receive()? {
            Reply::Detections { detections, compute_seconds } if detections.len() == batch.len => {
                Ok((detections, std::time::Duration::try_from_secs_f64(compute_seconds).unwrap_or_default()))
            }
            Reply::Error(e) => Err(PytorchError::Runner(e)),
            other => Err(self.protocol_error(&format!("expected {} detections, got {other:?}", batch.len))),
        }
    }

    fn send(&mut self, write: impl FnOnce(&mut BufWriter<ChildStdin>) -> std::io::Result<()>) -> Result<(), PytorchError> {
        let input = self.input.as_mut().expect("stdin is open until drop");
        match write(input).and_then(|_| input.flush()) {
            Ok(()) => Ok(()),
            // A runner that exits at once (a wrong binary, a crash on start) closes its pipe
            // before or while it is written to: say the same thing either way.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(self.died("it exited without an answer")),
            Err(e) => Err(self.died(&format!("writing to it failed: {e}"))),
        }
    }

    fn receive(&mut self) -> Result<Reply, PytorchError> {
        match read_message(&mut self.output) {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(self.died("it exited without an answer")),
            Err(e) => Err(self.protocol_error(&e.to_string())),
        }
    }

    /// The runner is gone: its exit status and the end of its stderr say why.
    fn died(&mut self, what: &str) -> PytorchError {
        self.input = None;
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
        let mut message = format!("{what} ({status})");
        if !tail.is_empty() {
            message.push_str(":\n  ");
            message.push_str(&tail.join("\n  "));
        }
        PytorchError::Io { runner: self.runner.clone(), message }
    }

    fn protocol_error(&self, what: &str) -> PytorchError {
        PytorchError::Io { runner: self.runner.clone(), message: format!("unexpected answer: {what}") }
    }
}

impl Drop for PytorchRunner {
    fn drop(&mut self) {
        // Closing stdin asks the runner to exit; wait so no zombie is left behind.
        self.input = None;
        let _ = self.child.wait();
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_exact_floats() {
        let det = Detections { boxes: vec![[0.1, 1.0 / 3.0, f32::MAX, 7.25]], scores: vec![0.999_999_9], labels: vec![3] };
        let mut buf = Vec::new();
        let reply = Reply::Detections { detections: vec![det, Detections::default()], compute_seconds: 0.25 };
        write_message(&mut buf, &reply).unwrap();
        write_message(&mut buf, &Reply::Ready { identity: "x".into() }).unwrap();
        let header = BatchHeader { len: 2, height: 1, width: 2 };
        write_message(&mut buf, &header).unwrap();
        buf.extend_from_slice(bytemuck::cast_slice(&[0.5f32; 12]));
        let mut input = std::io::Cursor::new(buf);
        assert_eq!(read_message::<Reply>(&mut input).unwrap(), Some(reply));
        assert_eq!(read_message::<Reply>(&mut input).unwrap(), Some(Reply::Ready { identity: "x".into() }));
        let h: BatchHeader = read_message(&mut input).unwrap().unwrap();
        assert_eq!(read_batch_data(&mut input, &h).unwrap(), vec![0.5f32; 12]);
        assert_eq!(read_message::<Reply>(&mut input).unwrap(), None);
    }

    #[test]
    fn a_garbled_line_is_an_error_not_a_panic() {
        let mut input = std::io::Cursor::new(b"{\"ready\n".to_vec());
        assert!(read_message::<Reply>(&mut input).is_err());
    }
}
