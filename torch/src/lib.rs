//! torchvision's FasterRCNN run natively on libtorch (through tch): the PyTorch side of
//! mkonnx's evaluations and parity checks when no eager evaluation is at hand.
//!
//! The network layers come from [`mkonnx::model::network`] and everything around them
//! (`AnchorGenerator`, `RegionProposalNetwork`, `MultiScaleRoIAlign`,
//! `RoIHeads.postprocess_detections`, `transform.postprocess`) from
//! [`mkonnx::model::detection::pipeline`]: the same descriptions the ONNX exporter emits,
//! executed by [`TchBackend`] as eager torchvision's ATen calls. [`TorchDetector::detect`]
//! adds the per-image resize of `GeneralizedRCNNTransform`.
//!
//! Exactness: on CPU with one thread the outputs are bit-identical to eager torchvision
//! (same libtorch kernels on same-shaped tensors; [`ops`] replays torchvision's CPU `nms` and
//! `roi_align` and torch's unstable sort). What has to hold for that:
//! - elementwise transcendental ops (`exp`, `sigmoid`, `log2`) run on tensors of exactly the
//!   shapes eager uses, because ATen computes a contiguous loop's tail with the scalar libm
//!   function and the rest with SIMD ones, which can differ in the last bit;
//! - hyperparameters that Python passes as doubles (NMS thresholds, BatchNorm eps) are read
//!   back as the decimal the config held ([`ops::python_float`]);
//! - `MultiScaleRoIAlign` fixes its level scales on the first batch it sees, as
//!   torchvision's module does (it caches them), so a detector answers a sequence of calls
//!   as one eager model object would.
//!
//! With more threads, libtorch splits loops differently and scores may move in the last
//! bits. On CUDA the network runs on the GPU; NMS and RoIAlign run on the CPU (the feature
//! maps are copied), matching torchvision's CPU kernels rather than its CUDA ones.

mod backend;
mod detect;
pub mod ops;

pub use backend::TchBackend;
pub use tch::Device;

use backend::WeightStore;
use mkonnx::model::weights::WeightError;
use mkonnx::model::{Architecture, Detector, DetectorParams};
use serde::{Deserialize, Serialize};
use std::cell::OnceCell;

/// Errors of the libtorch runner.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// CUDA was asked for, but libtorch sees no GPU.
    #[error("device `{requested}` requested, but libtorch sees no CUDA GPU (torch::cuda::is_available() is false); use --device cpu")]
    CudaUnavailable {
        /// The device as the user named it.
        requested: String,
    },
    /// A device name that is neither `cpu`, `cuda` nor `cuda:N`.
    #[error("unknown device `{0}` (expected cpu, cuda or cuda:N)")]
    UnknownDevice(String),
    /// The checkpoint does not fit the architecture.
    #[error("weights do not fit {arch}: {source}")]
    Weights {
        /// The architecture being run.
        arch: Architecture,
        /// What is missing or mis-shaped.
        source: WeightError,
    },
    /// An input image that is not a float32 [3, H, W] tensor with H, W > 0.
    #[error("image {index}: {reason}")]
    BadImage {
        /// Position in the batch.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A libtorch operation failed.
    #[error("libtorch failed in {step}: {source}")]
    Torch {
        /// The inference step.
        step: String,
        /// libtorch's message.
        source: tch::TchError,
    },
    /// NMS or RoIAlign was given inconsistent inputs (a bug, reported instead of a crash).
    #[error("{0}")]
    Ops(#[from] ops::OpsError),
}

/// Helper: attaches the inference step to a libtorch error.
pub(crate) trait TorchContext<T> {
    fn step(self, step: &str) -> Result<T, RuntimeError>;
}

impl<T> TorchContext<T> for Result<T, tch::TchError> {
    fn step(self, step: &str) -> Result<T, RuntimeError> {
        self.map_err(|source| RuntimeError::Torch { step: step.to_string(), source })
    }
}

pub use mkonnx::runtime::Detections;

/// Intermediate values of one image's inference, for debugging against eager.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Input [height, width].
    pub original_size: [i64; 2],
    /// [height, width] after the transform's resize.
    pub resized_size: [i64; 2],
    /// [height, width] of the padded batch tensor.
    pub padded_size: [i64; 2],
    /// RPN proposals after NMS (resized frame), by decreasing objectness.
    pub proposals: Vec<[f32; 4]>,
}

/// A FasterRCNN ready to run on libtorch: weights converted once to tensors on `device`.
///
/// Not `Sync` (tch tensors are not): use one per thread, or a lock.
pub struct TorchDetector {
    arch: Architecture,
    params: DetectorParams,
    device: Device,
    store: WeightStore,
    /// `MultiScaleRoIAlign`'s level scale exponents: set by the first batch, then kept, as
    /// torchvision's module keeps its scales.
    roi_levels: OnceCell<Vec<f64>>,
}

impl TorchDetector {
    /// Converts `detector`'s weights to tensors on `device`. Fails if `device` is CUDA and
    /// libtorch has no GPU.
    pub fn new(detector: &Detector, device: Device) -> Result<Self, RuntimeError> {
        check_device(device, &device_name(device))?;
        let _guard = tch::no_grad_guard();
        let store = WeightStore::new(&detector.weights, device, detector.arch)?;
        let arch = detector.arch;
        Ok(TorchDetector { arch, params: detector.params.clone(), device, store, roi_levels: OnceCell::new() })
    }

    /// The architecture this detector runs.
    pub fn arch(&self) -> Architecture {
        self.arch
    }

    /// Its inference hyperparameters.
    pub fn params(&self) -> &DetectorParams {
        &self.params
    }

    /// The device the network runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// `model(images)` in eval mode: one batch of [3, H, W] float32 images in 0..1 (any
    /// device; sizes may differ), one [`Detections`] per image.
    pub fn detect(&self, images: &[tch::Tensor]) -> Result<Vec<Detections>, RuntimeError> {
        Ok(self.detect_traced(images)?.into_iter().map(|(d, _)| d).collect())
    }

    /// [`detect`](Self::detect) with each image's [`Trace`].
    pub fn detect_traced(&self, images: &[tch::Tensor]) -> Result<Vec<(Detections, Trace)>, RuntimeError> {
        let _guard = tch::no_grad_guard();
        detect::run(self, images)
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`; CUDA only when libtorch sees a GPU.
pub fn parse_device(name: &str) -> Result<Device, RuntimeError> {
    let device = match name.trim() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => return Err(RuntimeError::UnknownDevice(name.to_string())),
        },
    };
    check_device(device, name)?;
    Ok(device)
}

fn check_device(device: Device, requested: &str) -> Result<(), RuntimeError> {
    if matches!(device, Device::Cuda(_)) {
        load_cuda_backend();
    }
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(i) if tch::Cuda::is_available() && (i as i64) < tch::Cuda::device_count() => Ok(()),
        Device::Cuda(_) => Err(RuntimeError::CudaUnavailable { requested: requested.to_string() }),
        other => Err(RuntimeError::UnknownDevice(device_name(other))),
    }
}

/// Loads libtorch's CUDA backend (`libtorch_cuda.so`) into the process, once.
///
/// The binary links only what it references, so the CUDA backend (and its GB of CUDA
/// libraries) is not loaded at start-up: CPU runs don't pay for it. Its static initializers
/// register CUDA with libtorch, so `--device cuda` loads it first: from the libtorch folder
/// found at build time, else by name (the rpath, `LD_LIBRARY_PATH`: a libtorch installed
/// elsewhere on the machine that runs it). Where it or the driver is missing,
/// `tch::Cuda::is_available()` stays false and the caller reports it.
fn load_cuda_backend() {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    LOADED.get_or_init(|| {
        let built_with = std::path::Path::new(option_env!("MKONNX_LIBTORCH_LIB").unwrap_or("")).join("libtorch_cuda.so");
        for path in [built_with.as_os_str(), std::ffi::OsStr::new("libtorch_cuda.so")] {
            // SAFETY: loading libtorch's own CUDA backend, for the libtorch this process runs;
            // the library is never unloaded (leaked), so no symbol outlives it.
            let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
            if let Ok(lib) = unsafe { libloading::os::unix::Library::open(Some(path), flags) } {
                std::mem::forget(lib);
                return true;
            }
        }
        false
    });
}

/// `cpu`, `cuda:N`, or libtorch's name for other devices.
fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Sets libtorch's intra-op thread count (process-wide). One thread gives results that are
/// bit-identical to eager PyTorch run with one thread.
pub fn set_num_threads(threads: usize) {
    tch::set_num_threads(threads.clamp(1, i32::MAX as usize) as i32);
}

/// Makes this process keep the memory that libtorch frees, for the next inference.
///
/// libtorch allocates every layer output with `malloc`. With glibc's defaults, blocks above
/// a (dynamic) threshold are fresh `mmap`s and a freed heap top is given back to the kernel,
/// so each inference faults in and zeroes its [R, 256, 7, 7] activations anew: on
/// resnet50_fpn_v2 that was 0.9 s of system time in 7 images, ~10% of the wall time. A
/// runner's peak memory is the same image after image, so keeping it costs nothing. Call it
/// first thing in a process that runs many inferences. Outside Linux with glibc it does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread of
    // ours allocates in parallel with it, and a rejected value leaves the default in place.
    unsafe {
        // Blocks up to 32 MiB (glibc's largest accepted threshold) come from the heap ...
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // ... and up to 1 GiB of free heap top stays mapped.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// torchvision's `to_tensor` of an 8-bit RGB image (row-major `height`×`width`×3 bytes):
/// a float32 [3, H, W] tensor of `byte / 255`.
pub fn image_from_rgb8(width: usize, height: usize, rgb: &[u8]) -> Result<tch::Tensor, RuntimeError> {
    if rgb.len() != width * height * 3 || width == 0 || height == 0 {
        return Err(RuntimeError::BadImage { index: 0, reason: format!("{} bytes for a {width}x{height} RGB image", rgb.len()) });
    }
    let t = tch::Tensor::f_from_slice(rgb).step("image conversion")?;
    let t = t.f_view([height as i64, width as i64, 3]).step("image conversion")?;
    let t = t.f_permute([2, 0, 1]).and_then(|t| t.f_contiguous()).step("image conversion")?;
    t.f_to_kind(tch::Kind::Float).and_then(|t| t.f_div_scalar(255)).step("image conversion")
}

/// A float32 [3, H, W] image tensor from CHW values in 0..1 (an [`mkonnx::runtime::RgbImage`]'s
/// `chw`, or one image of a batch); an error unless there are `3·height·width` of them.
pub fn image_from_chw(height: usize, width: usize, chw: &[f32]) -> Result<tch::Tensor, RuntimeError> {
    if chw.len() != 3 * height * width || width == 0 || height == 0 {
        return Err(RuntimeError::BadImage { index: 0, reason: format!("{} values for a {width}x{height} RGB image", chw.len()) });
    }
    tch::Tensor::f_from_slice(chw).and_then(|t| t.f_view([3, height as i64, width as i64])).step("image conversion")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync + 'static>() {}
    fn send<T: Send>() {}

    #[test]
    fn errors_cross_threads_and_the_detector_can_sit_in_a_mutex() {
        // anyhow needs Send + Sync errors; a Mutex<TorchDetector> is Sync when it is Send.
        send_sync::<RuntimeError>();
        send::<TorchDetector>();
    }

    #[test]
    fn device_names() {
        assert_eq!(device_name(Device::Cpu), "cpu");
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
        assert!(matches!(parse_device("cuda:x"), Err(RuntimeError::UnknownDevice(_))));
        assert!(matches!(parse_device(" cpu "), Ok(Device::Cpu)));
    }

    #[test]
    fn rgb8_conversion_is_to_tensor() {
        let t = image_from_rgb8(2, 1, &[0, 51, 255, 1, 2, 3]).unwrap();
        assert_eq!(t.size(), vec![3, 1, 2]);
        let mut v = vec![0f32; 6];
        t.copy_data(&mut v, 6);
        assert_eq!(v, vec![0.0, 1.0 / 255.0, 51.0 / 255.0, 2.0 / 255.0, 1.0, 3.0 / 255.0]);
        assert!(image_from_rgb8(2, 2, &[0; 6]).is_err());
    }
}
