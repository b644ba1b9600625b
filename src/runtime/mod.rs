//! Running detectors: the ONNX model on ONNX Runtime (in process) and the PyTorch model on
//! libtorch (in the `mkonnx-torch` runner process, see [`pytorch`]), and decoding images.

pub mod onnx;
pub mod pytorch;

use std::io::{BufRead, Seek};
use std::path::Path;

pub use crate::data::dataset::MAX_IMAGE_PIXELS;

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
    ///
    /// As PIL's `Image.open(p).convert("RGB")` with its defaults, an image of more than
    /// [`MAX_IMAGE_PIXELS`] pixels is an error (found from the header, before any pixel
    /// buffer is allocated), and so is a truncated file (PIL's `LOAD_TRUNCATED_IMAGES` is
    /// off: no gray fill).
    pub fn load(path: &Path) -> Result<RgbImage, RuntimeError> {
        let bytes = std::fs::read(path).map_err(|e| image_error(path, e.to_string()))?;
        let header = Header::read(std::io::Cursor::new(bytes.as_slice()), path)?;
        match header {
            Header::Jpeg(jpeg) => {
                let (width, height, rgb) = decode_jpeg(jpeg).map_err(|m| image_error(path, m))?;
                Ok(Self::from_rgb8(width, height, &rgb))
            }
            Header::Other(decoder) => {
                let rgb = image::DynamicImage::from_decoder(decoder).map_err(|e| image_error(path, e.to_string()))?.into_rgb8();
                Ok(Self::from_rgb8(rgb.width() as usize, rgb.height() as usize, rgb.as_raw()))
            }
        }
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

/// Width and height of an image from its header (the decoder [`RgbImage::load`] would use,
/// chosen by content as there, not by file name), checked against [`MAX_IMAGE_PIXELS`].
pub fn image_size(path: &Path) -> Result<(u32, u32), RuntimeError> {
    let file = std::fs::File::open(path).map_err(|e| image_error(path, e.to_string()))?;
    Ok(Header::read(std::io::BufReader::new(file), path)?.size())
}

fn image_error(path: &Path, message: String) -> RuntimeError {
    RuntimeError::Image { path: path.into(), message }
}

/// An image whose header has been read and whose size is within [`MAX_IMAGE_PIXELS`].
enum Header<'a, R> {
    /// A JPEG, for libjpeg-turbo (boxed: libjpeg's state is ~650 bytes).
    Jpeg(Box<mozjpeg::Decompress<R>>),
    /// Anything else (PNG), for the `image` crate.
    Other(Box<dyn image::ImageDecoder + 'a>),
}

impl<'a, R: BufRead + Seek + 'a> Header<'a, R> {
    /// Reads the header of the image in `reader` (`path` names it in errors) and checks its
    /// size before anything allocates its pixels.
    fn read(mut reader: R, path: &Path) -> Result<Header<'a, R>, RuntimeError> {
        let err = |message: String| image_error(path, message);
        let is_jpeg = reader.fill_buf().map_err(|e| err(e.to_string()))?.starts_with(&[0xFF, 0xD8, 0xFF]);
        let header = if is_jpeg {
            Header::Jpeg(Box::new(libjpeg(|| mozjpeg::Decompress::with_err(jpeg_error_manager()).from_reader(reader)).map_err(err)?))
        } else {
            let mut reader = image::ImageReader::new(reader).with_guessed_format().map_err(|e| err(e.to_string()))?;
            // The pixel check below is the limit; this lets every image under it through, in
            // the widest layout (RGBA, 16 bits a channel), and bounds the decoder's buffers.
            let mut limits = image::Limits::default();
            limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
            reader.limits(limits);
            Header::Other(Box::new(reader.into_decoder().map_err(|e| err(e.to_string()))?))
        };
        let (width, height) = header.size();
        let pixels = u64::from(width) * u64::from(height);
        if pixels > MAX_IMAGE_PIXELS {
            return Err(err(format!(
                "{width}x{height} is {pixels} pixels, more than the limit of {MAX_IMAGE_PIXELS} (PIL's default Image.MAX_IMAGE_PIXELS, a guard against decompression bombs)"
            )));
        }
        Ok(header)
    }

    /// Width and height.
    fn size(&self) -> (u32, u32) {
        match self {
            // JPEG sides are 16-bit.
            Header::Jpeg(d) => (d.width() as u32, d.height() as u32),
            Header::Other(d) => d.dimensions(),
        }
    }
}

/// Decodes a JPEG to interleaved RGB with libjpeg-turbo's decoder.
fn decode_jpeg<R: BufRead>(jpeg: Box<mozjpeg::Decompress<R>>) -> Result<(usize, usize, Vec<u8>), String> {
    let mut started = libjpeg(|| jpeg.rgb())?;
    let (w, h) = (started.width(), started.height());
    let rgb: Vec<u8> = libjpeg(|| started.read_scanlines())?;
    libjpeg(|| started.finish())?;
    Ok((w, h, rgb))
}

/// Runs a libjpeg call; its errors arrive by unwinding out of [`jpeg_error_manager`]'s
/// handlers (libjpeg's C code is built to unwind through) and become libjpeg's message.
fn libjpeg<T>(call: impl FnOnce() -> std::io::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("corrupt JPEG: {e}")),
        Err(payload) => Err(payload.downcast_ref::<String>().cloned().unwrap_or_else(|| "corrupt JPEG".into())),
    }
}

/// libjpeg's error manager: errors unwind with libjpeg's message, and so does the warning
/// that the data ended early, which libjpeg otherwise papers over by filling the rest of the
/// image with gray (PIL raises "image file is truncated" there). Other warnings (corrupt but
/// decodable data, such as extraneous bytes before a marker) are ignored, as PIL ignores them.
fn jpeg_error_manager() -> mozjpeg_sys::jpeg_error_mgr {
    // SAFETY: `jpeg_error_mgr` is a C struct of numbers and nullable pointers, for which
    // zeroes are valid; `jpeg_std_error` then fills it in.
    let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: initializes the struct it is given, which outlives the call.
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(jpeg_error_exit);
    err.emit_message = Some(jpeg_emit_message);
    err
}

extern "C-unwind" fn jpeg_error_exit(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    // resume_unwind, not panic!: no panic message is printed for a bad image.
    std::panic::resume_unwind(Box::new(format!("corrupt JPEG: {}", jpeg_message(cinfo))))
}

extern "C-unwind" fn jpeg_emit_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct, level: std::os::raw::c_int) {
    // SAFETY: libjpeg calls this with the cinfo whose `err` is the manager above.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == mozjpeg_sys::JWRN_JPEG_EOF as std::os::raw::c_int {
        std::panic::resume_unwind(Box::new("the JPEG data ends early: the file is truncated".to_string()))
    }
}

/// libjpeg's text for its current message.
fn jpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct) -> String {
    let mut buffer = [0u8; 80]; // JMSG_LENGTH_MAX
                                // SAFETY: `format_message` writes at most JMSG_LENGTH_MAX bytes, NUL-terminated, into its
                                // buffer; the binding declares the buffer `&[u8; 80]`, but C writes it, so it is passed
                                // from a mutable array (as the mozjpeg crate does).
    unsafe {
        if let Some(format) = (*cinfo.err).format_message {
            let format: unsafe extern "C-unwind" fn(&mut mozjpeg_sys::jpeg_common_struct, &mut [u8; 80]) = std::mem::transmute(format);
            format(cinfo, &mut buffer);
        }
    }
    let text = buffer.split(|&c| c == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A noisy RGB image, so that JPEG coding has real work to do.
    fn noise(width: u32, height: u32) -> image::RgbImage {
        let mut state = 12345u32;
        image::RgbImage::from_fn(width, height, |_, _| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            image::Rgb([(state >> 24) as u8, (state >> 16) as u8, (state >> 8) as u8])
        })
    }

    fn encode(img: impl Into<image::DynamicImage>, format: image::ImageFormat) -> Vec<u8> {
        let img: image::DynamicImage = img.into();
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn load_bytes(bytes: &[u8], name: &str) -> Result<RgbImage, RuntimeError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        RgbImage::load(&path)
    }

    /// A JPEG whose SOF header says `width` x `height` (the scan data is for the real size).
    fn with_jpeg_size(mut jpeg: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
        let sof = jpeg.windows(2).position(|w| w[0] == 0xFF && (w[1] == 0xC0 || w[1] == 0xC2)).unwrap();
        jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
        jpeg
    }

    #[test]
    fn pixels_are_those_of_the_decoders_as_called_before() {
        let img = noise(37, 23);
        let jpeg = encode(img.clone(), image::ImageFormat::Jpeg);
        let before: Vec<u8> = mozjpeg::Decompress::with_markers(&[]).from_mem(&jpeg).unwrap().rgb().unwrap().read_scanlines().unwrap();
        assert_eq!(load_bytes(&jpeg, "a.jpg").unwrap(), RgbImage::from_rgb8(37, 23, &before));
        let gray = encode(image::DynamicImage::ImageRgb8(img.clone()).to_luma8(), image::ImageFormat::Png);
        let png = encode(img.clone(), image::ImageFormat::Png);
        for bytes in [png, gray] {
            let before = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(load_bytes(&bytes, "a.png").unwrap(), RgbImage::from_rgb8(37, 23, before.as_raw()));
        }
    }

    #[test]
    fn truncated_images_are_errors_naming_the_file() {
        let jpeg = encode(noise(64, 48), image::ImageFormat::Jpeg);
        for cut in [jpeg.len() / 2, jpeg.len() - 2] {
            let e = load_bytes(&jpeg[..cut], "cut.jpg").unwrap_err().to_string();
            assert!(e.contains("cut.jpg") && e.contains("truncated"), "{cut}: {e}");
        }
        let png = encode(noise(64, 48), image::ImageFormat::Png);
        let e = load_bytes(&png[..png.len() / 2], "cut.png").unwrap_err().to_string();
        assert!(e.contains("cut.png") && e.contains("unexpected end of file"), "{e}");
        // Stricter than PIL, and as before: the png crate wants the IEND chunk too.
        let e = load_bytes(&png[..png.len() - 12], "no_iend.png").unwrap_err().to_string();
        assert!(e.contains("no_iend.png"), "{e}");
        // Like PIL: extraneous bytes before a marker are a warning, not an error.
        let mut extra = jpeg.clone();
        extra.splice(jpeg.len() - 2..jpeg.len() - 2, [1u8, 2, 3]);
        assert_eq!(load_bytes(&extra, "extra.jpg").unwrap(), load_bytes(&jpeg, "a.jpg").unwrap());
        let e = load_bytes(b"\xFF\xD8\xFFnot a jpeg", "bad.jpg").unwrap_err().to_string();
        assert!(e.contains("bad.jpg") && e.contains("corrupt JPEG"), "{e}");
    }

    #[test]
    fn images_over_the_pixel_limit_are_refused_from_the_header() {
        let jpeg = with_jpeg_size(encode(noise(16, 16), image::ImageFormat::Jpeg), 12_000, 12_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.jpg");
        std::fs::write(&path, &jpeg).unwrap();
        for e in [RgbImage::load(&path).unwrap_err(), image_size(&path).unwrap_err()] {
            let e = e.to_string();
            assert!(e.contains("big.jpg") && e.contains("12000x12000") && e.contains("89478485"), "{e}");
        }
        // At the limit, the header passes (the scan data then runs out).
        let side = (MAX_IMAGE_PIXELS as f64).sqrt() as u16;
        std::fs::write(&path, with_jpeg_size(jpeg, side, side)).unwrap();
        assert_eq!(image_size(&path).unwrap(), (u32::from(side), u32::from(side)));
    }

    #[test]
    fn sizes_come_from_the_content_not_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("really_a_jpeg.png");
        std::fs::write(&path, encode(noise(10, 7), image::ImageFormat::Jpeg)).unwrap();
        assert_eq!(image_size(&path).unwrap(), (10, 7));
        assert_eq!((RgbImage::load(&path).unwrap().width, RgbImage::load(&path).unwrap().height), (10, 7));
    }
}
