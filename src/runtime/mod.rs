//! Running detectors: the ONNX model on ONNX Runtime (in process) and the PyTorch model on
//! libtorch (in the `mkonnx-torch` runner process, see [`pytorch`]).

pub mod onnx;
pub mod pytorch;

/// Errors from the runtimes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// ONNX Runtime failed (loading the library, the model, or running it).
    #[error("ONNX Runtime: {0}")]
    OnnxRuntime(String),
    /// An image could not be read.
    #[error("cannot read image {path}: {message}")]
    Image {
        /// The image file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// One image's detections at its original size (as `model(images)` returns them): pixel x1,
/// y1, x2, y2, sorted by score.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detections {
    /// Boxes in pixels of the original image.
    pub boxes: Vec<[f32; 4]>,
    /// Scores, descending.
    pub scores: Vec<f32>,
    /// 1-indexed class labels.
    pub labels: Vec<i64>,
}

impl Detections {
    /// Number of detections.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }
}

/// Images of one size as a float32 [B, 3, H, W] batch in 0..1.
#[derive(Clone, Debug)]
pub struct ImageBatch {
    /// Number of images.
    pub len: usize,
    /// Height of every image.
    pub height: usize,
    /// Width of every image.
    pub width: usize,
    /// Row-major CHW data, image after image.
    pub data: Vec<f32>,
}

/// An RGB image as torchvision's `to_tensor(PIL.Image.open(p).convert("RGB"))` gives it:
/// float32 CHW in 0..1.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// CHW values in 0..1.
    pub chw: Vec<f32>,
}

impl RgbImage {
    /// Decodes a PNG or JPEG; grayscale is replicated and alpha dropped, as PIL's
    /// `convert("RGB")` does. JPEGs are decoded by libjpeg-turbo's decoder (through mozjpeg,
    /// accurate integer IDCT and fancy upsampling, PIL's defaults), so pixels are identical to
    /// what eager PyTorch pipelines see; other JPEG decoders differ by a level here and there,
    /// which moves detections.
    pub fn load(path: &std::path::Path) -> Result<RgbImage, RuntimeError> {
        let err = |message: String| RuntimeError::Image { path: path.into(), message };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            let (width, height, rgb) = decode_jpeg(&bytes).map_err(err)?;
            return Ok(Self::from_rgb8(width, height, &rgb));
        }
        let img = image::load_from_memory(&bytes).map_err(|e| err(e.to_string()))?;
        let rgb = img.to_rgb8();
        Ok(Self::from_rgb8(rgb.width() as usize, rgb.height() as usize, rgb.as_raw()))
    }

    /// From interleaved 8-bit RGB, as torchvision's `to_tensor` (value / 255).
    pub fn from_rgb8(width: usize, height: usize, rgb: &[u8]) -> RgbImage {
        let mut chw = vec![0f32; 3 * height * width];
        for (i, p) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * height * width + i] = f32::from(p[c]) / 255.0;
            }
        }
        RgbImage { height, width, chw }
    }

    /// A batch of one.
    pub fn to_batch(&self) -> ImageBatch {
        ImageBatch { len: 1, height: self.height, width: self.width, data: self.chw.clone() }
    }
}

impl ImageBatch {
    /// Stacks same-size images; `None` if sizes differ or `images` is empty.
    pub fn stack(images: &[&RgbImage]) -> Option<ImageBatch> {
        let first = images.first()?;
        if images.iter().any(|i| i.height != first.height || i.width != first.width) {
            return None;
        }
        let data = images.iter().flat_map(|i| i.chw.iter().copied()).collect();
        Some(ImageBatch { len: images.len(), height: first.height, width: first.width, data })
    }
}

/// Decodes a JPEG to interleaved RGB with libjpeg-turbo's decoder. libjpeg reports errors
/// by unwinding out of its error handler, caught here.
fn decode_jpeg(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    std::panic::catch_unwind(|| -> std::io::Result<(usize, usize, Vec<u8>)> {
        let mut d = mozjpeg::Decompress::with_markers(&[]).from_mem(bytes)?.rgb()?;
        let (w, h) = (d.width(), d.height());
        let pixels: Vec<[u8; 3]> = d.read_scanlines()?;
        d.finish()?;
        Ok((w, h, pixels.into_iter().flatten().collect()))
    })
    .map_err(|_| "corrupt JPEG".to_string())?
    .map_err(|e| format!("corrupt JPEG: {e}"))
}
