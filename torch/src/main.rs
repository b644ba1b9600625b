//! `mkonnx-torch`: mkonnx's PyTorch runner. `mkonnx` starts it for the stages that run the
//! PyTorch model (parity check, PyTorch evaluation); the protocol is described in
//! `mkonnx::runtime::pytorch`.
//!
//! ```text
//! mkonnx-torch serve                 load a model, then answer batches (stdin/stdout)
//! mkonnx-torch check-device DEVICE   exit 0 if libtorch can run on DEVICE (cpu, cuda, cuda:N)
//! ```

use anyhow::Context;
use mkonnx::model::Detector;
use mkonnx::runtime::pytorch::{read_batch_data, read_message, write_message, BatchHeader, Reply, RunnerSetup};
use mkonnx::runtime::Detections;
use mkonnx_torch::{image_from_chw, parse_device, set_num_threads, TorchDetector};
use std::io::{BufReader, BufWriter, Write};
use std::process::ExitCode;

const USAGE: &str = "usage: mkonnx-torch serve | mkonnx-torch check-device DEVICE\n\
    mkonnx's PyTorch runner; `mkonnx build` starts it when it runs the PyTorch model.";

fn main() -> ExitCode {
    die_with_parent();
    mkonnx_torch::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve"] => serve(),
        ["check-device", device] => parse_device(device).map(drop).map_err(anyhow::Error::from),
        ["--version" | "-V"] => {
            println!("mkonnx-torch, built as {}", mkonnx::build_identity());
            Ok(())
        }
        ["--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the model named by the first message, then answers one batch per header until stdin
/// closes. A failure of one batch is answered as an error and the next batch is served.
fn serve() -> anyhow::Result<()> {
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = BufWriter::new(std::io::stdout().lock());
    let Some(setup) = read_message::<RunnerSetup>(&mut input).context("reading the setup message")? else {
        return Ok(());
    };
    let detector = match load(&setup) {
        Ok(d) => d,
        Err(e) => {
            write_message(&mut output, &Reply::Error(format!("{e:#}")))?;
            output.flush()?;
            return Ok(());
        }
    };
    write_message(&mut output, &Reply::Ready { identity: mkonnx::build_identity().to_string() })?;
    output.flush()?;
    while let Some(header) = read_message::<BatchHeader>(&mut input).context("reading a batch header")? {
        let data = read_batch_data(&mut input, &header).context("reading a batch")?;
        let reply = match detect(&detector, &header, &data) {
            Ok((detections, compute)) => Reply::Detections { detections, compute_seconds: compute.as_secs_f64() },
            Err(e) => Reply::Error(format!("{e:#}")),
        };
        write_message(&mut output, &reply)?;
        output.flush()?;
    }
    Ok(())
}

/// Reads the checkpoint with mkonnx's reader and puts its weights on the device.
fn load(setup: &RunnerSetup) -> anyhow::Result<TorchDetector> {
    set_num_threads(setup.threads);
    let device = parse_device(setup.device.name())?;
    let (weights, _, _) = mkonnx::model::Weights::load_checkpoint(&setup.checkpoint)?;
    let detector = Detector { arch: setup.arch, params: setup.params.clone(), weights };
    Ok(TorchDetector::new(&detector, device)?)
}

/// Runs one batch; returns its detections and how long the model took (the conversion of
/// the received data to tensors is not counted: latency reports the model's time).
fn detect(detector: &TorchDetector, header: &BatchHeader, data: &[f32]) -> anyhow::Result<(Vec<Detections>, std::time::Duration)> {
    if header.len == 0 {
        return Ok((Vec::new(), std::time::Duration::ZERO));
    }
    if header.height == 0 || header.width == 0 {
        anyhow::bail!("a {}x{} image is empty", header.width, header.height);
    }
    let images = data
        .chunks(3 * header.height * header.width)
        .map(|chw| image_from_chw(header.height, header.width, chw))
        .collect::<Result<Vec<_>, _>>()
        .context("batch data")?;
    let start = std::time::Instant::now();
    let detections = detector.detect(&images)?;
    Ok((detections, start.elapsed()))
}

/// Asks the kernel to kill this process when the `mkonnx` that started it dies (even by
/// `kill -9`), so a runner never lingers holding a model's memory and threads. mkonnx names
/// itself in `MKONNX_PARENT_PID`: a parent that died before the request (while libtorch was
/// loading) shows as a different parent, and the runner leaves at once.
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and changes only this
    // process; getppid and _exit cannot fail.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        let expected = std::env::var("MKONNX_PARENT_PID").ok().and_then(|p| p.parse::<libc::pid_t>().ok());
        if expected.is_some_and(|p| p != libc::getppid()) {
            libc::_exit(1);
        }
    }
}
