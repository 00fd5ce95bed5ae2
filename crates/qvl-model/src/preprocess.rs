//! Image preprocessing for Qwen2-VL / Qwen3-VL vision encoders, matching the
//! Hugging Face image processor (`Qwen2VLImageProcessor`, PIL backend):
//!
//! 1. decode PNG/JPEG to RGB (alpha composited onto white);
//! 2. [`smart_resize`]: both sides to multiples of `patch_size * merge_size`
//!    (32 for Qwen3-VL) keeping the aspect ratio, the area within
//!    `min_pixels..=max_pixels`;
//! 3. bicubic resize with Pillow's exact algorithm (separable, antialiased
//!    when shrinking, 8-bit fixed point, horizontal pass first), see
//!    [`resize_bicubic_rgb8`] (bit-exact on the golden cases);
//! 4. rescale by 1/255 and normalize with the mean and std (0.5 for Qwen3-VL);
//! 5. patchify into `pixel_values` `[num_patches, 3 * temporal * patch * patch]`
//!    in the order the vision tower expects: patches grouped by
//!    `merge_size x merge_size` windows, and inside a row channel, then
//!    temporal copy, then patch row, then patch column. A still image is
//!    repeated to fill the temporal patch.
//!
//! ```no_run
//! use qvl_model::preprocess::{preprocess_path, ImageProcessorConfig};
//! let out = preprocess_path("cat.jpg", &ImageProcessorConfig::qwen3_vl())?;
//! println!("{:?} grid, {} patches of {}", out.grid_thw, out.num_patches, out.patch_dim);
//! # Ok::<(), qvl_model::preprocess::PreprocessError>(())
//! ```

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader, Limits};

/// What can go wrong preprocessing an image, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    // --- reading ---
    /// The file could not be read.
    #[error("cannot read image {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not a PNG or JPEG this crate can recognise.
    #[error("{what} is not a supported image (PNG or JPEG expected)")]
    NotAnImage {
        /// The file or buffer.
        what: String,
    },
    /// The image could not be decoded (truncated or corrupt).
    #[error("cannot decode image {what}: {source}")]
    Decode {
        /// The file or buffer.
        what: String,
        /// The decoder's error.
        source: image::ImageError,
    },

    // --- the image's size ---
    /// A width or height of zero.
    #[error("image {what} is empty ({width}x{height})")]
    Empty {
        /// The file or buffer.
        what: String,
        /// Width.
        width: u64,
        /// Height.
        height: u64,
    },
    /// More pixels than the configured decode limit.
    #[error("image {what} is {width}x{height} = {pixels} pixels, over the limit of {limit} (ImageProcessorConfig::max_decode_pixels)")]
    TooLarge {
        /// The file or buffer.
        what: String,
        /// Width.
        width: u64,
        /// Height.
        height: u64,
        /// width * height.
        pixels: u64,
        /// The limit.
        limit: u64,
    },
    /// An aspect ratio beyond what the processor accepts.
    #[error("image {width}x{height} has an aspect ratio over {max_ratio}:1")]
    AspectRatio {
        /// Width.
        width: u64,
        /// Height.
        height: u64,
        /// The largest ratio accepted.
        max_ratio: u64,
    },
    /// A raw buffer whose length does not match its dimensions.
    #[error("RGB buffer of {len} bytes does not hold {width}x{height}x3")]
    BufferSize {
        /// The buffer length.
        len: usize,
        /// Width.
        width: usize,
        /// Height.
        height: usize,
    },

    // --- configuration ---
    /// Settings that cannot work together.
    #[error("invalid image processor config: {0}")]
    BadConfig(String),
}

/// Result of this module.
pub type Result<T, E = PreprocessError> = std::result::Result<T, E>;

/// The largest aspect ratio `smart_resize` accepts (as in transformers).
pub const MAX_ASPECT_RATIO: u64 = 200;

/// Settings of the image processor (HF `preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Side of a square patch in pixels (16 for Qwen3-VL, 14 for Qwen2-VL).
    pub patch_size: usize,
    /// Frames per temporal patch (2); a still image is repeated.
    pub temporal_patch_size: usize,
    /// Patches merged per side by the vision merger (2).
    pub merge_size: usize,
    /// Smallest resized area in pixels (`size.shortest_edge` / `min_pixels`).
    pub min_pixels: u64,
    /// Largest resized area in pixels (`size.longest_edge` / `max_pixels`).
    pub max_pixels: u64,
    /// Per-channel mean subtracted after rescaling.
    pub image_mean: [f32; 3],
    /// Per-channel std divided by after subtracting the mean.
    pub image_std: [f32; 3],
    /// Factor applied to the 0..=255 values (1/255).
    pub rescale_factor: f64,
    /// Refuse to decode images with more pixels than this (decompression bombs).
    pub max_decode_pixels: u64,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self::qwen3_vl()
    }
}

impl ImageProcessorConfig {
    /// The settings Qwen3-VL checkpoints ship: patch 16, temporal 2, merge 2,
    /// mean = std = 0.5, area between 256*256 and 4096*4096.
    pub fn qwen3_vl() -> Self {
        Self {
            patch_size: 16,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 65_536,
            max_pixels: 16_777_216,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            rescale_factor: 1.0 / 255.0,
            // Pillow refuses images over twice its MAX_IMAGE_PIXELS (89,478,485).
            max_decode_pixels: 178_956_970,
        }
    }

    /// Reads a Hugging Face `preprocessor_config.json` (keys missing from
    /// the file keep the Qwen3-VL defaults).
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            PreprocessError::BadConfig(format!("preprocessor config is not JSON: {e}"))
        })?;
        let mut c = Self::qwen3_vl();
        let uint = |key: &str, at: &serde_json::Value| -> Result<Option<u64>> {
            match at.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(Some).ok_or_else(|| {
                    PreprocessError::BadConfig(format!(
                        "{key} must be a non-negative integer, got {x}"
                    ))
                }),
            }
        };
        let triple = |key: &str| -> Result<Option<[f32; 3]>> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => {
                    let vals: Option<Vec<f32>> = x.as_array().map(|a| {
                        a.iter()
                            .filter_map(|e| e.as_f64().map(|f| f as f32))
                            .collect()
                    });
                    match vals.as_deref() {
                        Some([a, b, c]) => Ok(Some([*a, *b, *c])),
                        _ => Err(PreprocessError::BadConfig(format!(
                            "{key} must be 3 numbers, got {x}"
                        ))),
                    }
                }
            }
        };
        if let Some(p) = uint("patch_size", &v)? {
            c.patch_size = p as usize;
        }
        if let Some(p) = uint("temporal_patch_size", &v)? {
            c.temporal_patch_size = p as usize;
        }
        if let Some(p) = uint("merge_size", &v)? {
            c.merge_size = p as usize;
        }
        if let Some(size) = v.get("size") {
            if let Some(p) = uint("shortest_edge", size)? {
                c.min_pixels = p;
            }
            if let Some(p) = uint("longest_edge", size)? {
                c.max_pixels = p;
            }
        }
        if let Some(p) = uint("min_pixels", &v)? {
            c.min_pixels = p;
        }
        if let Some(p) = uint("max_pixels", &v)? {
            c.max_pixels = p;
        }
        if let Some(m) = triple("image_mean")? {
            c.image_mean = m;
        }
        if let Some(s) = triple("image_std")? {
            c.image_std = s;
        }
        if let Some(r) = v.get("rescale_factor").and_then(|r| r.as_f64()) {
            c.rescale_factor = r;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PreprocessError::BadConfig(m));
        if self.patch_size == 0 || self.temporal_patch_size == 0 || self.merge_size == 0 {
            return bad(format!(
                "patch_size {}, temporal_patch_size {} and merge_size {} must be positive",
                self.patch_size, self.temporal_patch_size, self.merge_size
            ));
        }
        if self.patch_size > 1024 || self.merge_size > 64 || self.temporal_patch_size > 64 {
            return bad("patch, merge or temporal size implausibly large".into());
        }
        if self.min_pixels > self.max_pixels {
            return bad(format!(
                "min_pixels {} > max_pixels {}",
                self.min_pixels, self.max_pixels
            ));
        }
        let f = self.factor() as u64;
        if self.max_pixels < f * f {
            return bad(format!(
                "max_pixels {} is below one merged patch ({f}x{f})",
                self.max_pixels
            ));
        }
        if self.image_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return bad(format!(
                "image_std {:?} must be finite and non-zero",
                self.image_std
            ));
        }
        Ok(())
    }

    /// The side granularity of resized images: `patch_size * merge_size`.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per row of `pixel_values`: `3 * temporal * patch * patch`.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// A preprocessed image (or video clip), ready for the vision encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `[num_patches, patch_dim]`, row-major.
    pub pixel_values: Vec<f32>,
    /// Rows of `pixel_values`: `t * h * w` of the grid.
    pub num_patches: usize,
    /// Values per row: `3 * temporal * patch * patch`.
    pub patch_dim: usize,
    /// Patches along time, height and width (`image_grid_thw`).
    pub grid_thw: [usize; 3],
    /// Height and width after resizing, in pixels.
    pub resized_hw: [usize; 2],
}

impl ProcessedImage {
    /// Number of tokens the image becomes after the merger:
    /// `t * h * w / merge_size^2`.
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches / (merge_size * merge_size).max(1)
    }
}

/// Target size `(height, width)` for an image, as transformers' `smart_resize`:
/// both sides multiples of `factor`, the aspect ratio kept as well as
/// possible, and the area within `min_pixels..=max_pixels`.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(PreprocessError::Empty {
            what: "to resize".into(),
            width: width as u64,
            height: height as u64,
        });
    }
    if factor == 0 {
        return Err(PreprocessError::BadConfig("factor must be positive".into()));
    }
    let (h, w) = (height as f64, width as f64);
    if h.max(w) / h.min(w) > MAX_ASPECT_RATIO as f64 {
        return Err(PreprocessError::AspectRatio {
            width: width as u64,
            height: height as u64,
            max_ratio: MAX_ASPECT_RATIO,
        });
    }
    let f = factor as f64;
    // Python's round() rounds halves to even.
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

// ---------------------------------------------------------------------------
// Pillow's resampling (libImaging/Resample.c), bicubic with a = -0.5.

/// Fixed-point precision of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const BICUBIC_SUPPORT: f64 = 2.0;

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, number of taps, fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; negative values clamp to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let taps = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(taps) {
            let w = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + ksize];
        for (x, out) in row.iter_mut().enumerate().take(taps) {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = w * f64::from(1u32 << PRECISION_BITS);
            *out = if w < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        bounds.push((xmin, taps));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image (`height x width x 3`, row-major) with Pillow's
/// `Image.resize(..., BICUBIC)` algorithm: antialiased when shrinking,
/// 22-bit fixed-point weights, two separable passes with an 8-bit
/// intermediate image. Bit-exact against the Pillow that made the goldens.
pub fn resize_bicubic_rgb8(
    src: &[u8],
    width: usize,
    height: usize,
    new_width: usize,
    new_height: usize,
) -> Result<Vec<u8>> {
    if src.len() != width * height * 3 {
        return Err(PreprocessError::BufferSize {
            len: src.len(),
            width,
            height,
        });
    }
    if width == 0 || height == 0 || new_width == 0 || new_height == 0 {
        return Err(PreprocessError::Empty {
            what: "to resize".into(),
            width: width.min(new_width) as u64,
            height: height.min(new_height) as u64,
        });
    }
    if (width, height) == (new_width, new_height) {
        return Ok(src.to_vec());
    }
    let need_horizontal = new_width != width;
    let need_vertical = new_height != height;
    // Pillow does the pass that shrinks more first (vertical when
    // height/new_height > width/new_width), horizontal first on ties; the
    // 8-bit intermediate makes the order visible in the result.
    let vertical_first =
        need_horizontal && need_vertical && width * new_height < new_width * height;
    let mut img = src.to_vec();
    let (mut w, mut h) = (width, height);
    if vertical_first {
        img = resample_vertical(&img, w, &precompute_coeffs(h, new_height));
        h = new_height;
    }
    if need_horizontal {
        img = resample_horizontal(&img, w, h, &precompute_coeffs(w, new_width));
        w = new_width;
    }
    if need_vertical && !vertical_first {
        img = resample_vertical(&img, w, &precompute_coeffs(h, new_height));
    }
    Ok(img)
}

/// One horizontal pass over `rows` rows of RGB8 `width` pixels wide.
fn resample_horizontal(src: &[u8], width: usize, rows: usize, co: &Coeffs) -> Vec<u8> {
    let new_width = co.bounds.len();
    let mut out = vec![0u8; rows * new_width * 3];
    for y in 0..rows {
        let in_row = &src[y * width * 3..(y + 1) * width * 3];
        let out_row = &mut out[y * new_width * 3..(y + 1) * new_width * 3];
        for (xx, &(xmin, taps)) in co.bounds.iter().enumerate() {
            let k = &co.weights[xx * co.ksize..xx * co.ksize + taps];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &w) in k.iter().enumerate() {
                let p = &in_row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                for c in 0..3 {
                    ss[c] += i32::from(p[c]) * w;
                }
            }
            for c in 0..3 {
                out_row[xx * 3 + c] = clip8(ss[c]);
            }
        }
    }
    out
}

/// One vertical pass over RGB8 rows `width` pixels wide.
fn resample_vertical(src: &[u8], width: usize, co: &Coeffs) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; co.bounds.len() * stride];
    for (yy, &(ymin, taps)) in co.bounds.iter().enumerate() {
        let k = &co.weights[yy * co.ksize..yy * co.ksize + taps];
        let out_row = &mut out[yy * stride..(yy + 1) * stride];
        for (i, o) in out_row.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &w) in k.iter().enumerate() {
                ss += i32::from(src[(ymin + y) * stride + i]) * w;
            }
            *o = clip8(ss);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The pipeline.

/// Preprocesses a raw RGB image (`height x width x 3` bytes, row-major).
pub fn preprocess_rgb8(
    rgb: &[u8],
    width: usize,
    height: usize,
    cfg: &ImageProcessorConfig,
) -> Result<ProcessedImage> {
    cfg.validate()?;
    if width == 0 || height == 0 {
        return Err(PreprocessError::Empty {
            what: "buffer".into(),
            width: width as u64,
            height: height as u64,
        });
    }
    if width.checked_mul(height).and_then(|p| p.checked_mul(3)) != Some(rgb.len()) {
        return Err(PreprocessError::BufferSize {
            len: rgb.len(),
            width,
            height,
        });
    }
    let (new_h, new_w) = smart_resize(height, width, cfg.factor(), cfg.min_pixels, cfg.max_pixels)?;
    let resized = resize_bicubic_rgb8(rgb, width, height, new_w, new_h)?;
    let frame = normalize_chw(&resized, new_w, new_h, cfg);
    patchify(&[frame], new_w, new_h, cfg)
}

/// Rescales and normalizes an RGB8 image into a channel-first `f32` frame,
/// computed as the processor does: `(f32(v * rescale) - mean) / std`.
pub fn normalize_chw(
    rgb: &[u8],
    width: usize,
    height: usize,
    cfg: &ImageProcessorConfig,
) -> Vec<f32> {
    let plane = width * height;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in rgb.chunks_exact(3).enumerate().take(plane) {
        for c in 0..3 {
            let v = (f64::from(px[c]) * cfg.rescale_factor) as f32;
            out[c * plane + i] = (v - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    out
}

/// Cuts normalized channel-first frames (each `3 x height x width`) into
/// `pixel_values` rows, in transformers' order. Frames are padded by
/// repeating the last one to a multiple of `temporal_patch_size`.
///
/// Row order: temporal group, merge-window row, merge-window column, row in
/// the window, column in the window. Inside a row: channel, temporal copy,
/// patch row, patch column.
pub fn patchify(
    frames: &[Vec<f32>],
    width: usize,
    height: usize,
    cfg: &ImageProcessorConfig,
) -> Result<ProcessedImage> {
    cfg.validate()?;
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let f = cfg.factor();
    if frames.is_empty() || width == 0 || height == 0 || width % f != 0 || height % f != 0 {
        return Err(PreprocessError::BadConfig(format!(
            "patchify needs at least one frame and sides that are multiples of {f}, got {} frames of {width}x{height}",
            frames.len()
        )));
    }
    let plane = width * height;
    if let Some(bad) = frames.iter().find(|fr| fr.len() != 3 * plane) {
        return Err(PreprocessError::BufferSize {
            len: bad.len(),
            width,
            height,
        });
    }
    let grid_t = frames.len().div_ceil(tp);
    let (grid_h, grid_w) = (height / p, width / p);
    let patch_dim = cfg.patch_dim();
    let num_patches = grid_t * grid_h * grid_w;
    let mut out = Vec::with_capacity(num_patches * patch_dim);
    for t in 0..grid_t {
        for bh in 0..grid_h / m {
            for bw in 0..grid_w / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            for k in 0..tp {
                                // Past the last frame, repeat it.
                                let frame = &frames[(t * tp + k).min(frames.len() - 1)];
                                for py in 0..p {
                                    let start = c * plane + (y0 + py) * width + x0;
                                    out.extend_from_slice(&frame[start..start + p]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(ProcessedImage {
        pixel_values: out,
        num_patches,
        patch_dim,
        grid_thw: [grid_t, grid_h, grid_w],
        resized_hw: [height, width],
    })
}

/// Decodes PNG/JPEG bytes into RGB8, alpha composited onto white.
/// `what` names the source in errors.
pub fn decode_rgb8(
    bytes: &[u8],
    what: &str,
    cfg: &ImageProcessorConfig,
) -> Result<image::RgbImage> {
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>> {
        let r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| PreprocessError::Decode {
                what: what.to_string(),
                source: image::ImageError::IoError(e),
            })?;
        if r.format().is_none() {
            return Err(PreprocessError::NotAnImage {
                what: what.to_string(),
            });
        }
        Ok(r)
    };
    let decode_err = |source| PreprocessError::Decode {
        what: what.to_string(),
        source,
    };
    let (w, h) = reader()?.into_dimensions().map_err(decode_err)?;
    let (w, h) = (u64::from(w), u64::from(h));
    if w == 0 || h == 0 {
        return Err(PreprocessError::Empty {
            what: what.to_string(),
            width: w,
            height: h,
        });
    }
    if w * h > cfg.max_decode_pixels {
        return Err(PreprocessError::TooLarge {
            what: what.to_string(),
            width: w,
            height: h,
            pixels: w * h,
            limit: cfg.max_decode_pixels,
        });
    }
    let mut r = reader()?;
    let mut limits = Limits::default();
    // Room for the largest pixel format (16-bit RGBA) plus decoder state.
    limits.max_alloc = Some(w * h * 8 + (64 << 20));
    r.limits(limits);
    let img = r.decode().map_err(decode_err)?;
    Ok(to_rgb_on_white(img))
}

fn to_rgb_on_white(img: DynamicImage) -> image::RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = image::RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(p[3]);
        for c in 0..3 {
            // alpha-over white, rounded like Pillow's alpha_composite.
            o[c] = ((u32::from(p[c]) * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

/// Decodes and preprocesses PNG/JPEG bytes.
pub fn preprocess_bytes(bytes: &[u8], cfg: &ImageProcessorConfig) -> Result<ProcessedImage> {
    let img = decode_rgb8(bytes, "image buffer", cfg)?;
    let (w, h) = img.dimensions();
    preprocess_rgb8(img.as_raw(), w as usize, h as usize, cfg)
}

/// Reads, decodes and preprocesses a PNG/JPEG file.
pub fn preprocess_path(
    path: impl AsRef<Path>,
    cfg: &ImageProcessorConfig,
) -> Result<ProcessedImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| PreprocessError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let img = decode_rgb8(&bytes, &path.display().to_string(), cfg)?;
    let (w, h) = img.dimensions();
    preprocess_rgb8(img.as_raw(), w as usize, h as usize, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers() {
        let f = 32;
        let (min, max) = (64 * 64, 256 * 256);
        assert_eq!(smart_resize(64, 96, f, min, max).unwrap(), (64, 96));
        assert_eq!(smart_resize(75, 100, f, min, max).unwrap(), (64, 96));
        assert_eq!(smart_resize(300, 500, f, min, max).unwrap(), (192, 320));
        // Too small: scaled up to reach min_pixels.
        assert_eq!(smart_resize(10, 20, f, min, max).unwrap(), (64, 96));
        // Round half to even, as Python: 48/32 = 1.5 -> 2, 80/32 = 2.5 -> 2.
        assert_eq!(smart_resize(48, 80, f, 0, max).unwrap(), (64, 64));
        assert!(matches!(
            smart_resize(1, 300, f, min, max),
            Err(PreprocessError::AspectRatio { .. })
        ));
        assert!(matches!(
            smart_resize(0, 30, f, min, max),
            Err(PreprocessError::Empty { .. })
        ));
    }

    #[test]
    fn resize_keeps_constant_images_constant_and_is_identity_at_same_size() {
        let src = vec![77u8; 37 * 23 * 3];
        for (w, h) in [(64, 32), (10, 7), (37, 64), (96, 96)] {
            let out = resize_bicubic_rgb8(&src, 37, 23, w, h).unwrap();
            assert_eq!(out.len(), w * h * 3);
            assert!(out.iter().all(|&v| v == 77), "{w}x{h}");
        }
        let img: Vec<u8> = (0..12 * 5 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_bicubic_rgb8(&img, 12, 5, 12, 5).unwrap(), img);
        assert!(resize_bicubic_rgb8(&img, 12, 4, 6, 2).is_err());
    }

    #[test]
    fn patch_order_follows_merge_windows() {
        let cfg = ImageProcessorConfig {
            patch_size: 2,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 0,
            max_pixels: 1 << 20,
            ..ImageProcessorConfig::qwen3_vl()
        };
        // 8x4 image (w x h): value = channel*1000 + y*10 + x.
        let (w, h) = (8, 4);
        let frame: Vec<f32> = (0..3 * w * h)
            .map(|i| ((i / (w * h)) * 1000 + (i % (w * h) / w) * 10 + i % w) as f32)
            .collect();
        let out = patchify(&[frame], w, h, &cfg).unwrap();
        assert_eq!(out.grid_thw, [1, 2, 4]);
        assert_eq!((out.num_patches, out.patch_dim), (8, 24));
        let row = |r: usize| &out.pixel_values[r * 24..(r + 1) * 24];
        // Row 1 is the second patch of the first 2x2 window: x 2..4, y 0..2.
        assert_eq!(&row(1)[..8], &[2., 3., 12., 13., 2., 3., 12., 13.]);
        // Row 2 is the window's second row: y 2..4, x 0..2.
        assert_eq!(&row(2)[..4], &[20., 21., 30., 31.]);
        // Row 4 starts the second window: x 4..6; channel 1 comes after both copies of channel 0.
        assert_eq!(&row(4)[..4], &[4., 5., 14., 15.]);
        assert_eq!(row(4)[8], 1004.0);
        assert_eq!(out.num_tokens(2), 2);
    }

    #[test]
    fn config_from_preprocessor_json() {
        let c = ImageProcessorConfig::from_json(
            r#"{"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
                "size": {"shortest_edge": 3136, "longest_edge": 12845056},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}"#,
        )
        .unwrap();
        assert_eq!(
            (c.patch_size, c.min_pixels, c.max_pixels),
            (14, 3136, 12_845_056)
        );
        assert_eq!(c.factor(), 28);
        assert!(ImageProcessorConfig::from_json("{").is_err());
        assert!(ImageProcessorConfig::from_json(r#"{"patch_size": 0}"#).is_err());
        assert!(ImageProcessorConfig::from_json(r#"{"image_std": [1, 0, 1]}"#).is_err());
        assert!(ImageProcessorConfig::from_json(r#"{"image_mean": [1, 2]}"#).is_err());
    }
}
