//! Image preprocessing against the Hugging Face processor's output
//! (tests/data/images, made by tests/data/make_image_golden.py), and the
//! errors bad images give.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::path::Path;

use qvl_model::preprocess::{
    preprocess_bytes, preprocess_path, preprocess_rgb8, ImageProcessorConfig, PreprocessError,
};
use safetensors::SafeTensors;

fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/images")
}

fn golden_config(meta: &serde_json::Value) -> ImageProcessorConfig {
    let s = &meta["settings"];
    let triple = |k: &str| {
        let a: Vec<f32> = s[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        [a[0], a[1], a[2]]
    };
    ImageProcessorConfig {
        patch_size: s["patch_size"].as_u64().unwrap() as usize,
        temporal_patch_size: s["temporal_patch_size"].as_u64().unwrap() as usize,
        merge_size: s["merge_size"].as_u64().unwrap() as usize,
        min_pixels: s["size"]["shortest_edge"].as_u64().unwrap(),
        max_pixels: s["size"]["longest_edge"].as_u64().unwrap(),
        image_mean: triple("image_mean"),
        image_std: triple("image_std"),
        ..ImageProcessorConfig::qwen3_vl()
    }
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn matches_the_hugging_face_processor() {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir().join("images.json")).unwrap()).unwrap();
    let bytes = std::fs::read(data_dir().join("images.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cfg = golden_config(&meta);
    let exact_tol = meta["tolerance"]["exact_cases_max_abs"].as_f64().unwrap();
    let resized_tol = meta["tolerance"]["resized_cases_mean_abs"]
        .as_f64()
        .unwrap();
    for (name, case) in meta["cases"].as_object().unwrap() {
        let (h, w) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        let img = st.tensor(&format!("{name}.image")).unwrap();
        assert_eq!(img.shape(), [h, w, 3]);
        let out = preprocess_rgb8(img.data(), w, h, &cfg).unwrap();
        let grid: Vec<usize> = case["grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(out.grid_thw.to_vec(), grid, "{name}: grid_thw");
        let thw: Vec<i64> = st
            .tensor(&format!("{name}.image_grid_thw"))
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(thw, grid.iter().map(|&g| g as i64).collect::<Vec<_>>());
        let want = f32s(&st, &format!("{name}.pixel_values"));
        assert_eq!(
            st.tensor(&format!("{name}.pixel_values")).unwrap().shape(),
            [out.num_patches, out.patch_dim]
        );
        assert_eq!(out.pixel_values.len(), want.len(), "{name}: size");
        let diffs: Vec<f64> = out
            .pixel_values
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from((a - b).abs()))
            .collect();
        let max = diffs.iter().cloned().fold(0.0, f64::max);
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let resized = [h, w] != [out.resized_hw[0], out.resized_hw[1]];
        println!(
            "{name}: resized {resized} to {:?}, max abs {max:.3e}, mean abs {mean:.3e}",
            out.resized_hw
        );
        if resized {
            assert!(
                mean <= resized_tol,
                "{name}: mean abs {mean} > {resized_tol}"
            );
        }
        // Stricter than the golden asks: the Pillow-exact resize makes every
        // case, resized or not, match to float rounding.
        assert!(max <= exact_tol, "{name}: max abs {max} > {exact_tol}");
    }
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 5) as u8, (y * 7) as u8, 99]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn png_and_jpeg_files_go_through_the_pipeline() {
    let cfg = ImageProcessorConfig {
        min_pixels: 64 * 64,
        max_pixels: 256 * 256,
        ..ImageProcessorConfig::qwen3_vl()
    };
    let png = png_bytes(100, 75);
    let from_bytes = preprocess_bytes(&png, &cfg).unwrap();
    assert_eq!(from_bytes.grid_thw, [1, 4, 6]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.png");
    std::fs::write(&p, &png).unwrap();
    assert_eq!(preprocess_path(&p, &cfg).unwrap(), from_bytes);

    let img = image::RgbImage::from_fn(64, 96, |x, y| image::Rgb([x as u8 * 3, y as u8 * 2, 128]));
    let mut jpg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpg, image::ImageFormat::Jpeg).unwrap();
    let out = preprocess_bytes(jpg.get_ref(), &cfg).unwrap();
    assert_eq!(out.grid_thw, [1, 6, 4]);
    assert!(out.pixel_values.iter().all(|v| (-1.0..=1.0).contains(v)));

    // RGBA is composited onto white: a fully transparent image is white (1.0).
    let rgba = image::RgbaImage::from_pixel(64, 64, image::Rgba([0, 0, 0, 0]));
    let mut b = std::io::Cursor::new(Vec::new());
    rgba.write_to(&mut b, image::ImageFormat::Png).unwrap();
    let out = preprocess_bytes(b.get_ref(), &cfg).unwrap();
    assert!(out.pixel_values.iter().all(|&v| v == 1.0));
}

#[test]
fn bad_images_give_clear_errors() {
    let cfg = ImageProcessorConfig::qwen3_vl();
    let png = png_bytes(64, 64);

    let err = preprocess_bytes(b"definitely not an image", &cfg).unwrap_err();
    assert!(matches!(err, PreprocessError::NotAnImage { .. }), "{err}");

    let err = preprocess_bytes(&png[..png.len() / 2], &cfg).unwrap_err();
    assert!(matches!(err, PreprocessError::Decode { .. }), "{err}");
    let err = preprocess_bytes(&png[..20], &cfg).unwrap_err();
    assert!(matches!(err, PreprocessError::Decode { .. }), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let err = preprocess_path(dir.path().join("missing.png"), &cfg).unwrap_err();
    assert!(err.to_string().contains("missing.png"), "{err}");

    // A PNG header claiming 100000 x 100000 pixels (CRC fixed up) is refused before decoding.
    let mut huge = png.clone();
    huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&huge[12..29]);
    huge[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    let err = preprocess_bytes(&huge, &cfg).unwrap_err();
    assert!(matches!(err, PreprocessError::TooLarge { .. }), "{err}");

    let err = preprocess_rgb8(&[], 0, 10, &cfg).unwrap_err();
    assert!(matches!(err, PreprocessError::Empty { .. }), "{err}");
    let err = preprocess_rgb8(&[0; 10], 2, 2, &cfg).unwrap_err();
    assert!(matches!(err, PreprocessError::BufferSize { .. }), "{err}");
    let err = preprocess_rgb8(&vec![0; 1000 * 2 * 3], 1000, 2, &cfg).unwrap_err();
    assert!(matches!(err, PreprocessError::AspectRatio { .. }), "{err}");
    let bad = ImageProcessorConfig {
        merge_size: 0,
        ..cfg
    };
    let err = preprocess_rgb8(&[0; 12], 2, 2, &bad).unwrap_err();
    assert!(matches!(err, PreprocessError::BadConfig(_)), "{err}");
}
