//! `qvl golden` and `qvl generate` on the tiny Qwen3-VL checkpoint in the repo.
use std::path::PathBuf;
use std::process::Command;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qvl-model/tests/data/qwen3vl-tiny")
}

fn qvl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qvl"))
}

#[test]
fn golden_passes_every_case() {
    let out = qvl()
        .args(["golden", "--model"])
        .arg(tiny())
        .arg("--golden")
        .arg(tiny().join("golden.safetensors"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for case in ["text", "image", "two_images"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(case))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(line.ends_with("ok"), "{line}");
    }
    assert!(text.contains("3 passed, 0 failed"), "{text}");
}

#[test]
fn generate_with_an_image_file() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("gradient.png");
    let img = image::RgbImage::from_fn(40, 56, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 4) as u8, 128])
    });
    img.save(&png).unwrap();
    // 501 = vision_start, 502 = vision_end in the tiny checkpoint.
    let out = qvl()
        .args(["generate", "--model"])
        .arg(tiny())
        .args([
            "--prompt-ids",
            "1,2,501,502,3",
            "--max-tokens",
            "5",
            "--image",
        ])
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    assert!(ids.iter().all(|&t| t < 512));
}

#[test]
fn generate_names_a_bad_image_and_a_bad_id() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-an-image.png");
    std::fs::write(&bad, b"hello").unwrap();
    let out = qvl()
        .args(["generate", "--model"])
        .arg(tiny())
        .args(["--prompt-ids", "1,2", "--image"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not-an-image.png"), "{err}");

    let out = qvl()
        .args(["generate", "--model"])
        .arg(tiny())
        .args(["--prompt-ids", "1,x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"x\" is not a token id"));
}
