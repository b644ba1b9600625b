//! Detection visualizations: predicted and ground-truth boxes drawn on an image, with
//! class labels and scores, encoded as PNG.
//!
//! Drawing order is ground truth first, then predictions, so predictions sit on top.
//! Everything is clipped to the image: boxes partly or wholly outside it, zero-size
//! boxes and swapped corners draw what is visible; boxes with a non-finite coordinate
//! are skipped. Text uses the public-domain 8x8 bitmap font (crate `font8x8`), scaled
//! by whole pixels so it stays crisp.
//!
//! Pixel convention: a box `[x1, y1, x2, y2]` covers the pixel columns
//! `round(x1) ..= round(x2) - 1` (and rows likewise), the same half-open reading as
//! torchvision's continuous boxes, and its outline is drawn inside that area so the
//! outline's outer edge is exactly where the box says.

use image::{ImageFormat, Rgb, RgbImage};
use std::io::Cursor;

/// Errors from building or encoding a visualization.
#[derive(Debug, thiserror::Error)]
pub enum VisualizeError {
    /// The CHW float buffer does not hold `3 * height * width` values.
    #[error("CHW image buffer has {got} values, expected 3 x {height} x {width} = {expected}")]
    ShapeMismatch {
        /// Requested height.
        height: usize,
        /// Requested width.
        width: usize,
        /// `3 * height * width`, or `usize::MAX` when that overflows.
        expected: usize,
        /// Length of the buffer given.
        got: usize,
    },
    /// The PNG encoder failed.
    #[error("cannot encode a {width}x{height} visualization as PNG: {source}")]
    Encode {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// The encoder's error.
        source: image::ImageError,
    },
}

/// One box to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct DrawBox {
    /// `[x1, y1, x2, y2]` in pixels of the image being drawn on.
    pub bbox: [f32; 4],
    /// Class name shown in the label (may be empty).
    pub label: String,
    /// Detection score, shown with two decimals after the name; `None` for ground truth.
    pub score: Option<f32>,
    /// Class index used to pick the colour from [`Style::palette`]; when `None` the
    /// colour comes from a stable hash of `label`. An explicit index keeps the classes
    /// of one dataset in distinct colours, where a hash could map two to the same one.
    pub class_id: Option<usize>,
}

/// How boxes and labels look.
#[derive(Debug, Clone, PartialEq)]
pub struct Style {
    /// Outline width in pixels; `None` scales with the image (at least 2).
    pub line_width: Option<u32>,
    /// Integer upscaling of the 8x8 font; `None` is 1 below 400 px, 2 from 400 px
    /// (larger image side).
    pub text_scale: Option<u32>,
    /// Prediction colours, indexed by class. Empty falls back to [`DEFAULT_PALETTE`].
    pub palette: Vec<Rgb<u8>>,
    /// Ground-truth colour, deliberately outside the prediction palette.
    pub ground_truth_color: Rgb<u8>,
    /// Draw ground truth dashed so it reads apart from predictions even where they overlap.
    pub ground_truth_dashed: bool,
    /// Label ground truth with its class name (below the box, where prediction labels
    /// never go).
    pub ground_truth_labels: bool,
}

/// Bright prediction colours that contrast with each other and with the green of the
/// ground truth.
pub const DEFAULT_PALETTE: [Rgb<u8>; 8] = [
    Rgb([255, 56, 56]),   // red
    Rgb([0, 160, 255]),   // azure
    Rgb([255, 210, 30]),  // yellow
    Rgb([180, 70, 255]),  // violet
    Rgb([255, 55, 199]),  // magenta
    Rgb([0, 229, 255]),   // cyan
    Rgb([255, 128, 32]),  // orange
    Rgb([110, 120, 255]), // periwinkle
];

impl Default for Style {
    fn default() -> Self {
        Style {
            line_width: None,
            text_scale: None,
            palette: DEFAULT_PALETTE.to_vec(),
            ground_truth_color: Rgb([0, 255, 0]),
            ground_truth_dashed: true,
            ground_truth_labels: true,
        }
    }
}

impl Style {
    /// Outline width used for an image of this size.
    pub fn resolved_line_width(&self, width: u32, height: u32) -> u32 {
        self.line_width.unwrap_or_else(|| (width.max(height).saturating_add(150) / 300).max(2)).max(1)
    }

    /// Font scale used for an image of this size.
    pub fn resolved_text_scale(&self, width: u32, height: u32) -> u32 {
        self.text_scale.unwrap_or(if width.max(height) < 400 { 1 } else { 2 }).max(1)
    }

    /// Colour of a prediction box.
    pub fn color_for(&self, b: &DrawBox) -> Rgb<u8> {
        let palette: &[Rgb<u8>] = if self.palette.is_empty() { &DEFAULT_PALETTE } else { &self.palette };
        let index = match b.class_id {
            Some(id) => id % palette.len(),
            None => (fnv1a(b.label.as_bytes()) % palette.len() as u64) as usize,
        };
        palette[index]
    }
}

/// FNV-1a: stable across runs and platforms, unlike `std`'s randomly seeded hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Draws `ground_truth` then `predictions` on a copy of `rgb`.
pub fn draw_detections(rgb: &RgbImage, predictions: &[DrawBox], ground_truth: &[DrawBox], style: &Style) -> RgbImage {
    let mut img = rgb.clone();
    let (w, h) = img.dimensions();
    let lw = i64::from(style.resolved_line_width(w, h));
    let scale = i64::from(style.resolved_text_scale(w, h));
    let gt = style.ground_truth_color;
    // Outlines first and labels last, so no outline ever crosses a label's text.
    let mut labels = Vec::new();
    for b in ground_truth {
        let Some(r) = pixel_rect(&img, b.bbox) else {
            continue;
        };
        stroke_rect(&mut img, r, lw, gt, style.ground_truth_dashed);
        if style.ground_truth_labels && !b.label.is_empty() {
            let (_, label_h) = label_size(&b.label, scale);
            // Below the box, or inside its bottom when the box touches the image bottom.
            let below = r.b + 1;
            let top = if below + label_h <= i64::from(h) { below } else { below - label_h };
            labels.push((r.l, top, b.label.clone(), gt));
        }
    }
    for b in predictions {
        let Some(r) = pixel_rect(&img, b.bbox) else {
            continue;
        };
        let color = style.color_for(b);
        stroke_rect(&mut img, r, lw, color, false);
        let text = label_text(b);
        if !text.is_empty() {
            let (_, label_h) = label_size(&text, scale);
            // Above the box, or inside its top when there is no room above.
            let top = if r.t - label_h >= 0 { r.t - label_h } else { r.t.max(0) };
            labels.push((r.l, top, text, color));
        }
    }
    for (left, top, text, color) in labels {
        draw_label(&mut img, left, top, &text, scale, color);
    }
    img
}

/// Encodes an image as PNG bytes.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, VisualizeError> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).map_err(|source| VisualizeError::Encode {
        width: img.width(),
        height: img.height(),
        source,
    })?;
    Ok(out.into_inner())
}

/// Converts a float CHW (RGB planes) image with values in 0..1 to RGB8: each value is
/// clamped to 0..1 and becomes `round(v * 255)`; NaN becomes 0.
pub fn from_chw(chw: &[f32], height: usize, width: usize) -> Result<RgbImage, VisualizeError> {
    let plane = height.checked_mul(width);
    let expected = plane.and_then(|p| p.checked_mul(3)).unwrap_or(usize::MAX);
    let dims = (u32::try_from(width), u32::try_from(height));
    let (Some(plane), (Ok(w), Ok(h))) = (plane, dims) else {
        return Err(VisualizeError::ShapeMismatch { height, width, expected, got: chw.len() });
    };
    if chw.len() != expected {
        return Err(VisualizeError::ShapeMismatch { height, width, expected, got: chw.len() });
    }
    let to_u8 = |v: f32| {
        if v.is_nan() {
            0
        } else {
            (v.clamp(0.0, 1.0) * 255.0).round() as u8
        }
    };
    let mut raw = Vec::with_capacity(expected);
    for i in 0..plane {
        raw.extend([chw[i], chw[plane + i], chw[2 * plane + i]].map(to_u8));
    }
    RgbImage::from_raw(w, h, raw).ok_or(VisualizeError::ShapeMismatch { height, width, expected, got: chw.len() })
}

/// Inclusive pixel rectangle, possibly reaching outside the image.
#[derive(Debug, Clone, Copy)]
struct Rect {
    l: i64,
    t: i64,
    r: i64,
    b: i64,
}

/// The pixels a box covers, or `None` when a coordinate is non-finite or the box misses
/// the image entirely. Huge coordinates saturate in the `as` conversion.
fn pixel_rect(img: &RgbImage, bbox: [f32; 4]) -> Option<Rect> {
    if !bbox.iter().all(|v| v.is_finite()) {
        return None;
    }
    let [x1, y1, x2, y2] = bbox.map(|v| (v.round() as i64).clamp(-(1 << 40), 1 << 40));
    let (l, r) = (x1.min(x2), x1.max(x2));
    let (t, b) = (y1.min(y2), y1.max(y2));
    // A zero-size box still shows as one pixel: a detection that exists should be seen.
    let rect = Rect { l, t, r: (r - 1).max(l), b: (b - 1).max(t) };
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    (rect.r >= 0 && rect.b >= 0 && rect.l < w && rect.t < h).then_some(rect)
}

/// Fills an inclusive rectangle, clipped to the image.
fn fill(img: &mut RgbImage, l: i64, t: i64, r: i64, b: i64, c: Rgb<u8>) {
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let (l, t, r, b) = (l.max(0), t.max(0), r.min(w - 1), b.min(h - 1));
    for y in t..=b {
        for x in l..=r {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// Draws a rectangle's outline `lw` pixels wide, inside the rectangle. Dashes are laid
/// out from the top-left corner along each side, so that corner is always drawn.
fn stroke_rect(img: &mut RgbImage, rc: Rect, lw: i64, c: Rgb<u8>, dashed: bool) {
    let Rect { l, t, r, b } = rc;
    if !dashed {
        fill(img, l, t, r, (t + lw - 1).min(b), c);
        fill(img, l, (b - lw + 1).max(t), r, b, c);
        fill(img, l, t, (l + lw - 1).min(r), b, c);
        fill(img, (r - lw + 1).max(l), t, r, b, c);
        return;
    }
    let (on, period) = (4 * lw, 7 * lw);
    // Only dashes that can touch the image are visited, so huge boxes cost nothing extra.
    let visible = |from: i64, to: i64, extent: u32| {
        let first = from + ((0 - from).max(0) / period) * period;
        let last = to.min(i64::from(extent));
        (first..=last).step_by(period as usize).map(move |s| (s, (s + on - 1).min(to)))
    };
    for (s, e) in visible(l, r, img.width()) {
        fill(img, s, t, e, (t + lw - 1).min(b), c);
        fill(img, s, (b - lw + 1).max(t), e, b, c);
    }
    for (s, e) in visible(t, b, img.height()) {
        fill(img, l, s, (l + lw - 1).min(r), e, c);
        fill(img, (r - lw + 1).max(l), s, r, e, c);
    }
}

/// "name 0.93", "name", or "0.93".
fn label_text(b: &DrawBox) -> String {
    match b.score.filter(|s| s.is_finite()) {
        Some(s) if b.label.is_empty() => format!("{s:.2}"),
        Some(s) => format!("{} {s:.2}", b.label),
        None => b.label.clone(),
    }
}

/// Width and height of a label's background: the glyphs plus `scale` pixels of padding
/// on each side.
fn label_size(text: &str, scale: i64) -> (i64, i64) {
    let chars = text.chars().count() as i64;
    (chars * 8 * scale + 2 * scale, 8 * scale + 2 * scale)
}

/// Draws a filled label with its top-left at (`left`, `top`). A label that would run
/// past the right edge moves left to stay whole when it fits the image, and is clipped
/// when it does not.
fn draw_label(img: &mut RgbImage, left: i64, top: i64, text: &str, scale: i64, bg: Rgb<u8>) {
    let (lw, lh) = label_size(text, scale);
    let width = i64::from(img.width());
    let left = if left + lw > width { (width - lw).max(0) } else { left.max(0) };
    fill(img, left, top, left + lw - 1, top + lh - 1, bg);
    let fg = contrasting(bg);
    let (x0, y0) = (left + scale, top + scale);
    for (i, ch) in text.chars().enumerate() {
        let gx = x0 + i as i64 * 8 * scale;
        if gx >= width {
            break;
        }
        // The legacy table covers ASCII; anything else shows as '?'.
        let code = if ch.is_ascii() { ch as usize } else { '?' as usize };
        for (row, bits) in font8x8::legacy::BASIC_LEGACY[code].iter().enumerate() {
            for col in 0..8 {
                // Bit 0 is the leftmost pixel of the row.
                if bits >> col & 1 == 1 {
                    let (x, y) = (gx + col * scale, y0 + row as i64 * scale);
                    fill(img, x, y, x + scale - 1, y + scale - 1, fg);
                }
            }
        }
    }
}

/// Black or white, whichever has the higher WCAG contrast ratio against `bg`: black
/// when its relative luminance is above 0.179, where the two ratios cross.
fn contrasting(bg: Rgb<u8>) -> Rgb<u8> {
    let linear = |c: u8| {
        let c = f32::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let [r, g, b] = bg.0.map(linear);
    if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GREY: Rgb<u8> = Rgb([128, 128, 128]);
    const PRED: Rgb<u8> = Rgb([200, 10, 30]);

    fn grey(w: u32, h: u32) -> RgbImage {
        RgbImage::from_pixel(w, h, GREY)
    }

    fn pred(bbox: [f32; 4], label: &str, score: Option<f32>) -> DrawBox {
        DrawBox { bbox, label: label.into(), score, class_id: None }
    }

    fn style(lw: u32) -> Style {
        Style { line_width: Some(lw), text_scale: Some(1), palette: vec![PRED], ..Style::default() }
    }

    #[test]
    fn outline_is_where_the_box_says_and_inside_is_untouched() {
        let img = grey(100, 80);
        let out = draw_detections(&img, &[pred([10.0, 20.0, 60.0, 70.0], "", None)], &[], &style(2));
        // Columns 10..=59, rows 20..=69; a 2-pixel outline inside that area.
        for (x, y) in [(10, 20), (11, 21), (59, 20), (10, 69), (59, 69), (35, 20), (35, 21)] {
            assert_eq!(*out.get_pixel(x, y), PRED, "outline at ({x}, {y})");
        }
        for (x, y) in [(10, 45), (11, 45), (58, 45), (59, 45), (35, 68), (35, 69)] {
            assert_eq!(*out.get_pixel(x, y), PRED, "outline at ({x}, {y})");
        }
        for (x, y) in [(12, 45), (57, 45), (35, 22), (35, 67), (35, 45), (9, 45), (60, 45), (35, 70)] {
            assert_eq!(*out.get_pixel(x, y), GREY, "untouched at ({x}, {y})");
        }
        // With no label text nothing but the outline changes.
        let changed = out.pixels().zip(img.pixels()).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 2 * 50 * 2 + 2 * 46 * 2);
    }

    #[test]
    fn ground_truth_is_drawn_in_its_colour_under_predictions() {
        let s = style(2);
        let gt = pred([5.0, 5.0, 40.0, 40.0], "", None);
        let out = draw_detections(&grey(64, 64), &[], std::slice::from_ref(&gt), &s);
        assert_eq!(*out.get_pixel(5, 5), s.ground_truth_color);
        assert_eq!(*out.get_pixel(5, 6), s.ground_truth_color);
        assert_eq!(*out.get_pixel(20, 20), GREY);
        // Dashed: some of the top edge is left grey.
        assert!((5..40).any(|x| *out.get_pixel(x, 5) == GREY));
        let both = draw_detections(&grey(64, 64), std::slice::from_ref(&gt), std::slice::from_ref(&gt), &s);
        assert_eq!(*both.get_pixel(5, 5), PRED);
    }

    #[test]
    fn label_sits_above_the_box_or_inside_at_the_top() {
        let s = style(2);
        let fg = contrasting(PRED);
        let out = draw_detections(&grey(120, 80), &[pred([20.0, 40.0, 90.0, 70.0], "cat", Some(0.93))], &[], &s);
        // 10-pixel-high label on rows 30..=39, starting at x = 20, 8 chars * 8 + 2 wide.
        let region = |img: &RgbImage, t: u32| -> Vec<Rgb<u8>> {
            (t..t + 10).flat_map(|y| (20..20 + 66).map(move |x| (x, y))).map(|(x, y)| *img.get_pixel(x, y)).collect()
        };
        let px = region(&out, 30);
        assert!(px.iter().all(|p| *p == PRED || *p == fg));
        let text = px.iter().filter(|p| **p == fg).count();
        assert!(text > 40, "{text} text pixels");
        assert!((0..120).all(|x| *out.get_pixel(x, 29) == GREY));
        assert_eq!(*out.get_pixel(20 + 66, 35), GREY);
        // Box touching the top: the label goes inside, from its top row down.
        let out = draw_detections(&grey(120, 80), &[pred([20.0, 0.0, 90.0, 70.0], "cat", Some(0.93))], &[], &s);
        let px = region(&out, 0);
        assert!(px.iter().all(|p| *p == PRED || *p == fg));
        assert!(px.iter().filter(|p| **p == fg).count() == text);
    }

    #[test]
    fn label_text_reads_name_and_score() {
        assert_eq!(label_text(&pred([0.0; 4], "cat", Some(0.926))), "cat 0.93");
        assert_eq!(label_text(&pred([0.0; 4], "", Some(0.5))), "0.50");
        assert_eq!(label_text(&pred([0.0; 4], "dog", None)), "dog");
        assert_eq!(label_text(&pred([0.0; 4], "dog", Some(f32::NAN))), "dog");
    }

    #[test]
    fn labels_at_the_right_edge_shift_or_clip() {
        let s = style(2);
        let out = draw_detections(&grey(60, 40), &[pred([50.0, 20.0, 59.0, 30.0], "ab", Some(0.5))], &[], &s);
        // "ab 0.50" is 7 * 8 + 2 = 58 wide: it moves left to x = 2 and stays whole.
        assert_eq!(*out.get_pixel(2, 10), PRED);
        assert_eq!(*out.get_pixel(1, 10), GREY);
        let out = draw_detections(&grey(30, 40), &[pred([5.0, 20.0, 25.0, 30.0], "a long name", Some(0.5))], &[], &s);
        assert!((0..30).all(|x| *out.get_pixel(x, 10) != GREY));
    }

    #[test]
    fn degenerate_boxes_do_not_panic() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let boxes: Vec<DrawBox> = [
            [nan, 0.0, 10.0, 10.0],
            [0.0, 0.0, inf, 10.0],
            [-inf, -inf, inf, inf],
            [5.0, 5.0, 5.0, 5.0],
            [-50.0, -50.0, -10.0, -10.0],
            [100.0, 100.0, 200.0, 200.0],
            [-1e30, -1e30, 1e30, 1e30],
            [30.0, 30.0, 10.0, 10.0],
            [-5.0, -5.0, 10.0, 10.0],
            [35.0, 25.0, 45.0, 35.0],
        ]
        .into_iter()
        .map(|b| pred(b, "x\u{e9}", Some(0.5)))
        .collect();
        for (w, h) in [(40, 30), (1, 1), (0, 0), (0, 5)] {
            for s in [Style::default(), style(1), style(50), Style { palette: vec![], ..style(1) }] {
                let out = draw_detections(&grey(w, h), &boxes, &boxes, &s);
                assert_eq!(out.dimensions(), (w, h));
            }
        }
        // Non-finite and wholly outside boxes draw nothing.
        let img = grey(40, 30);
        let out = draw_detections(&img, &boxes[..3], &boxes[4..6], &style(2));
        assert_eq!(out, img);
        // A zero-size box shows as a single pixel.
        let out = draw_detections(&img, &[pred([5.0, 5.0, 5.0, 5.0], "", None)], &[], &style(2));
        assert_eq!(*out.get_pixel(5, 5), PRED);
        assert_eq!(*out.get_pixel(6, 6), GREY);
        // A box cut by the image's top-left corner: its inner edges show.
        let out = draw_detections(&img, &[pred([-5.0, -5.0, 10.0, 10.0], "", None)], &[], &style(2));
        assert_eq!(*out.get_pixel(9, 0), PRED);
        assert_eq!(*out.get_pixel(0, 9), PRED);
        assert_eq!(*out.get_pixel(0, 0), GREY);
    }

    #[test]
    fn default_style_scales_with_the_image() {
        let s = Style::default();
        assert_eq!(s.resolved_line_width(320, 240), 2);
        assert_eq!(s.resolved_line_width(1333, 800), 4);
        assert_eq!(s.resolved_text_scale(320, 240), 1);
        assert_eq!(s.resolved_text_scale(640, 480), 2);
        assert_eq!(Style { line_width: Some(0), ..s }.resolved_line_width(10, 10), 1);
    }

    #[test]
    fn colours_are_stable_and_follow_class_ids() {
        let s = Style::default();
        let a = pred([0.0; 4], "triangle", None);
        assert_eq!(s.color_for(&a), s.color_for(&a.clone()));
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        for id in 0..20 {
            let b = DrawBox { class_id: Some(id), ..a.clone() };
            assert_eq!(s.color_for(&b), DEFAULT_PALETTE[id % DEFAULT_PALETTE.len()]);
        }
        assert!(!DEFAULT_PALETTE.contains(&s.ground_truth_color));
    }

    #[test]
    fn contrast_picks_black_on_bright_and_white_on_dark() {
        assert_eq!(contrasting(Rgb([255, 210, 30])), Rgb([0, 0, 0]));
        assert_eq!(contrasting(Rgb([0, 255, 0])), Rgb([0, 0, 0]));
        assert_eq!(contrasting(Rgb([0, 160, 255])), Rgb([0, 0, 0]));
        assert_eq!(contrasting(Rgb([0, 0, 180])), Rgb([255, 255, 255]));
        assert_eq!(contrasting(Rgb([200, 10, 30])), Rgb([255, 255, 255]));
    }

    #[test]
    fn png_round_trips() {
        let img = draw_detections(&grey(33, 17), &[pred([2.0, 9.0, 30.0, 16.0], "k", Some(1.0))], &[], &style(1));
        let png = encode_png(&img).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back, img);
    }

    #[test]
    fn chw_converts_clamps_and_checks_shape() {
        // 2x3 (h x w) image; pixel (x, y) takes plane[c][y * 3 + x].
        let mut chw = vec![0.0f32; 18];
        chw[..6].copy_from_slice(&[0.0, 0.5, 1.0, -1.0, 2.0, f32::NAN]);
        chw[6..12].copy_from_slice(&[0.25, 0.0, 0.0, 0.0, 0.0, 0.1]);
        chw[12..].copy_from_slice(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.999]);
        let img = from_chw(&chw, 2, 3).unwrap();
        assert_eq!(img.dimensions(), (3, 2));
        assert_eq!(img.get_pixel(0, 0).0, [0, 64, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [128, 0, 0]);
        assert_eq!(img.get_pixel(2, 0).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(0, 1).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 1).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(2, 1).0, [0, 26, 255]);
        assert!(matches!(from_chw(&chw, 3, 3), Err(VisualizeError::ShapeMismatch { expected: 27, got: 18, .. })));
        assert!(from_chw(&chw, usize::MAX, 2).is_err());
        assert_eq!(from_chw(&[], 0, 0).unwrap().dimensions(), (0, 0));
    }
}
