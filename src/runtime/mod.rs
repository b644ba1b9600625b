//! Running detectors: the ONNX model on ONNX Runtime and the PyTorch model on libtorch.

pub mod onnx;
pub mod torch;

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

/// One image's detections at its original size: pixel x1, y1, x2, y2, sorted by score.
#[derive(Clone, Debug, Default, PartialEq)]
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
    /// `convert("RGB")` does.
    pub fn load(path: &std::path::Path) -> Result<RgbImage, RuntimeError> {
        let img = image::ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| RuntimeError::Image { path: path.into(), message: e.to_string() })?
            .decode()
            .map_err(|e| RuntimeError::Image { path: path.into(), message: e.to_string() })?;
        let rgb = img.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let mut chw = vec![0f32; 3 * h * w];
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                chw[c * h * w + i] = f32::from(p.0[c]) / 255.0;
            }
        }
        Ok(RgbImage { height: h, width: w, chw })
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
