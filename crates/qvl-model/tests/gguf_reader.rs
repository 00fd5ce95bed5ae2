//! GGUF reader tests over files written by a small writer below: metadata of
//! every type, tensors of every dequantizable type (checked against values
//! computed from the block fields), alignment, and hostile files.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use half::{bf16, f16};
use qvl_model::gguf::{
    dequantize, hf_row_of_gguf_row, unpermute_qk_rows, GgmlType, GgufError, GgufFile, GgufHeader,
    LlamaHyperparams, MetadataValue,
};

// ---------------------------------------------------------------------------
// A minimal GGUF writer.

enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(&'static str),
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl V {
    fn type_id(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            V::U8(v) => out.push(*v),
            V::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::Bool(v) => out.push(u8::from(*v)),
            V::Str(s) => put_str(out, s),
            V::Arr(t, items) => {
                out.extend_from_slice(&t.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for i in items {
                    i.write(out);
                }
            }
            V::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Tensor {
    name: &'static str,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
}

fn write_gguf(kv: &[(&str, V)], tensors: &[Tensor], alignment: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        v.write(&mut out);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.type_id.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(alignment) * alignment;
    }
    let data_start = (out.len() as u64).div_ceil(alignment) * alignment;
    out.resize(data_start as usize, 0);
    for (t, o) in tensors.iter().zip(offsets) {
        out.resize((data_start + o) as usize, 0);
        out.extend_from_slice(&t.data);
    }
    out
}

// ---------------------------------------------------------------------------
// Reference encoders: each builds blocks from chosen fields, and returns the
// values those fields mean according to the ggml format description.

fn lcg(seed: &mut u64) -> u32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) as u32
}

fn q8_0_blocks(n_blocks: usize, seed: &mut u64) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut vals) = (Vec::new(), Vec::new());
    for b in 0..n_blocks {
        let d = f16::from_f32(0.01 * (b as f32 + 1.0));
        bytes.extend_from_slice(&d.to_le_bytes());
        for _ in 0..32 {
            let q = (lcg(seed) % 256) as u8 as i8;
            bytes.push(q as u8);
            vals.push(f32::from(q) * d.to_f32());
        }
    }
    (bytes, vals)
}

fn q4_blocks(n_blocks: usize, with_min: bool, seed: &mut u64) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut vals) = (Vec::new(), Vec::new());
    for b in 0..n_blocks {
        let d = f16::from_f32(0.05 * (b as f32 + 1.0));
        let m = f16::from_f32(-0.3 + 0.1 * b as f32);
        bytes.extend_from_slice(&d.to_le_bytes());
        if with_min {
            bytes.extend_from_slice(&m.to_le_bytes());
        }
        let nib: Vec<u8> = (0..32).map(|_| (lcg(seed) % 16) as u8).collect();
        for j in 0..16 {
            bytes.push(nib[j] | (nib[j + 16] << 4));
        }
        for &q in &nib {
            vals.push(if with_min {
                f32::from(q) * d.to_f32() + m.to_f32()
            } else {
                (f32::from(q) - 8.0) * d.to_f32()
            });
        }
    }
    (bytes, vals)
}

fn q4_k_block(seed: &mut u64) -> (Vec<u8>, Vec<f32>) {
    let d = f16::from_f32(0.02);
    let dmin = f16::from_f32(0.01);
    let ls: Vec<u8> = (0..8).map(|_| (lcg(seed) % 64) as u8).collect();
    let lm: Vec<u8> = (0..8).map(|_| (lcg(seed) % 64) as u8).collect();
    let l: Vec<u8> = (0..256).map(|_| (lcg(seed) % 16) as u8).collect();
    let mut scales = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            scales[j] = ls[j];
            scales[j + 4] = lm[j];
        } else {
            scales[j + 4] = (ls[j] & 0xf) | ((lm[j] & 0xf) << 4);
            scales[j - 4] |= (ls[j] >> 4) << 6;
            scales[j] |= (lm[j] >> 4) << 6;
        }
    }
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&d.to_le_bytes());
    bytes.extend_from_slice(&dmin.to_le_bytes());
    bytes.extend_from_slice(&scales);
    for j in (0..256).step_by(64) {
        for i in 0..32 {
            bytes.push(l[j + i] | (l[j + i + 32] << 4));
        }
    }
    let vals = (0..256)
        .map(|i| {
            let sub = i / 32;
            d.to_f32() * f32::from(ls[sub]) * f32::from(l[i]) - dmin.to_f32() * f32::from(lm[sub])
        })
        .collect();
    (bytes, vals)
}

fn q6_k_block(seed: &mut u64) -> (Vec<u8>, Vec<f32>) {
    let d = f16::from_f32(0.003);
    let l: Vec<u8> = (0..256).map(|_| (lcg(seed) % 64) as u8).collect();
    let sc: Vec<i8> = (0..16)
        .map(|_| (lcg(seed) % 200) as i32 - 100)
        .map(|v| v as i8)
        .collect();
    let (mut ql, mut qh) = (vec![0u8; 128], vec![0u8; 64]);
    for (h, j) in (0..256).step_by(128).enumerate() {
        for i in 0..32 {
            let q = |k: usize| l[j + i + 32 * k];
            ql[h * 64 + i] = (q(0) & 0xf) | ((q(2) & 0xf) << 4);
            ql[h * 64 + i + 32] = (q(1) & 0xf) | ((q(3) & 0xf) << 4);
            qh[h * 32 + i] =
                (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    let mut bytes = ql;
    bytes.extend_from_slice(&qh);
    bytes.extend(sc.iter().map(|&s| s as u8));
    bytes.extend_from_slice(&d.to_le_bytes());
    let vals = (0..256)
        .map(|i| d.to_f32() * f32::from(sc[i / 16]) * (f32::from(l[i]) - 32.0))
        .collect();
    (bytes, vals)
}

/// Name, type and expected values of one tensor of the sample file.
type Expected = (&'static str, GgmlType, Vec<f32>);

/// A file with every metadata type and one tensor of each dequantizable type.
fn sample_file(alignment: u64) -> (Vec<u8>, Vec<Expected>) {
    let mut seed = 7u64;
    let f32_vals: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let f16_vals: Vec<f32> = (0..8)
        .map(|i| f16::from_f32(i as f32 / 3.0).to_f32())
        .collect();
    let bf16_vals: Vec<f32> = (0..8)
        .map(|i| bf16::from_f32(-(i as f32) / 7.0).to_f32())
        .collect();
    let (q8, q8v) = q8_0_blocks(4, &mut seed);
    let (q40, q40v) = q4_blocks(2, false, &mut seed);
    let (q41, q41v) = q4_blocks(3, true, &mut seed);
    let (q4k, q4kv) = q4_k_block(&mut seed);
    let (q6k, q6kv) = q6_k_block(&mut seed);
    let tensors = vec![
        Tensor {
            name: "f32",
            dims: vec![6, 4],
            type_id: 0,
            data: f32_vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
        Tensor {
            name: "f16",
            dims: vec![8],
            type_id: 1,
            data: f16_vals
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
        },
        Tensor {
            name: "bf16",
            dims: vec![4, 2],
            type_id: 30,
            data: bf16_vals
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
        },
        Tensor {
            name: "q8_0",
            dims: vec![64, 2],
            type_id: 8,
            data: q8,
        },
        Tensor {
            name: "q4_0",
            dims: vec![64],
            type_id: 2,
            data: q40,
        },
        Tensor {
            name: "q4_1",
            dims: vec![32, 3],
            type_id: 3,
            data: q41,
        },
        Tensor {
            name: "q4_k",
            dims: vec![256],
            type_id: 12,
            data: q4k,
        },
        Tensor {
            name: "q6_k",
            dims: vec![256],
            type_id: 14,
            data: q6k,
        },
    ];
    let mut kv = vec![
        ("general.architecture", V::Str("llama")),
        ("t.u8", V::U8(200)),
        ("t.i8", V::I8(-5)),
        ("t.u16", V::U16(60000)),
        ("t.i16", V::I16(-300)),
        ("t.u32", V::U32(4_000_000_000)),
        ("t.i32", V::I32(-70000)),
        ("t.f32", V::F32(1.5)),
        ("t.bool", V::Bool(true)),
        ("t.u64", V::U64(1 << 40)),
        ("t.i64", V::I64(-(1 << 40))),
        ("t.f64", V::F64(0.25)),
        ("t.strs", V::Arr(8, vec![V::Str("a"), V::Str("ünï")])),
        (
            "t.nested",
            V::Arr(
                9,
                vec![V::Arr(4, vec![V::U32(1), V::U32(2)]), V::Arr(4, vec![])],
            ),
        ),
    ];
    if alignment != 32 {
        kv.push(("general.alignment", V::U32(alignment as u32)));
    }
    let expected = vec![
        ("f32", GgmlType::F32, f32_vals),
        ("f16", GgmlType::F16, f16_vals),
        ("bf16", GgmlType::BF16, bf16_vals),
        ("q8_0", GgmlType::Q8_0, q8v),
        ("q4_0", GgmlType::Q4_0, q40v),
        ("q4_1", GgmlType::Q4_1, q41v),
        ("q4_k", GgmlType::Q4_K, q4kv),
        ("q6_k", GgmlType::Q6_K, q6kv),
    ];
    (write_gguf(&kv, &tensors, alignment), expected)
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

// ---------------------------------------------------------------------------

#[test]
fn reads_metadata_of_every_type() {
    let (bytes, _) = sample_file(32);
    let h = GgufHeader::parse(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    assert_eq!(h.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(h.get("t.u8"), Some(&MetadataValue::U8(200)));
    assert_eq!(h.get("t.i8"), Some(&MetadataValue::I8(-5)));
    assert_eq!(h.get_u64("t.u16").unwrap(), 60000);
    assert_eq!(h.get("t.i16").unwrap().as_i64(), Some(-300));
    assert_eq!(h.get_u64("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(h.get("t.i32").unwrap().as_i64(), Some(-70000));
    assert_eq!(h.get_f64("t.f32").unwrap(), 1.5);
    assert!(h.get_bool("t.bool").unwrap());
    assert_eq!(h.get_u64("t.u64").unwrap(), 1 << 40);
    assert_eq!(h.get("t.i64").unwrap().as_i64(), Some(-(1 << 40)));
    assert_eq!(h.get_f64("t.f64").unwrap(), 0.25);
    let strs: Vec<&str> = h
        .get_array("t.strs")
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(strs, ["a", "ünï"]);
    let nested = h.get_array("t.nested").unwrap();
    assert_eq!(nested[0].as_array().unwrap().len(), 2);
    assert!(nested[1].as_array().unwrap().is_empty());
    assert!(matches!(
        h.get_str("t.u8"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        h.get_u64("nope"),
        Err(GgufError::MissingKey { .. })
    ));
    assert!(matches!(
        h.get_u64("t.i8"),
        Err(GgufError::WrongType { .. })
    ));
}

#[test]
fn dequantizes_every_supported_type_from_a_mapped_file() {
    for alignment in [32u64, 64, 256] {
        let (bytes, expected) = sample_file(alignment);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.header().alignment, alignment);
        assert_eq!(file.header().data_start % alignment, 0);
        for (name, ty, want) in &expected {
            let info = file.tensor_info(name).unwrap();
            assert_eq!(info.ty, *ty);
            assert_eq!(info.offset % alignment, 0);
            let got = file.dequantize_tensor(name).unwrap();
            assert_close(&got, want, name);
        }
        let f = file.tensor_info("f32").unwrap();
        assert_eq!(f.shape(), [4, 6]);
        assert_eq!((f.row_len(), f.n_rows(), f.row_bytes()), (6, 4, 24));
        let q = file.tensor_info("q8_0").unwrap();
        assert_eq!((q.row_len(), q.n_rows(), q.row_bytes()), (64, 2, 68));
    }
}

#[test]
fn block_wise_dequant_works_on_tiles() {
    let (bytes, expected) = sample_file(32);
    let h = GgufHeader::parse(&bytes).unwrap();
    let info = h.tensor("q8_0").unwrap();
    let data = qvl_model::gguf::tensor_slice(&bytes, &h, info);
    // Second row, second block only: bytes 68+34..68+68, values 96..128.
    let mut tile = [0f32; 32];
    dequantize(GgmlType::Q8_0, &data[102..136], &mut tile).unwrap();
    assert_close(&tile, &expected[3].2[96..128], "q8_0 tile");
    // A partial block is refused, not guessed.
    let err = dequantize(GgmlType::Q8_0, &data[..30], &mut tile).unwrap_err();
    assert!(matches!(err, GgufError::DequantLength { .. }), "{err}");
    let err = dequantize(GgmlType::Q5_K, &[0u8; 176], &mut [0f32; 256]).unwrap_err();
    assert!(matches!(err, GgufError::DequantUnsupported { .. }), "{err}");
}

#[test]
fn bad_magic_and_version_are_named() {
    let (mut bytes, _) = sample_file(32);
    let err = GgufHeader::parse(b"GGML\x03\0\0\0").unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
    let err = GgufHeader::parse(b"GG").unwrap_err();
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    bytes[4] = 4;
    let err = GgufHeader::parse(&bytes).unwrap_err();
    assert!(
        matches!(err, GgufError::UnsupportedVersion { version: 4 }),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let err = GgufFile::open(dir.path().join("missing.gguf")).unwrap_err();
    assert!(err.to_string().contains("missing.gguf"), "{err}");
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let (bytes, _) = sample_file(32);
    let h = GgufHeader::parse(&bytes).unwrap();
    for len in 0..bytes.len() {
        let r = GgufHeader::parse(&bytes[..len]);
        assert!(
            r.is_err(),
            "prefix of {len} bytes parsed (data starts at {})",
            h.data_start
        );
    }
    // Cut inside the data section: the last tensor ends past the end.
    let err = GgufHeader::parse(&bytes[..bytes.len() - 1]).unwrap_err();
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
    assert!(err.to_string().contains("q6_k"), "{err}");
}

#[test]
fn hostile_counts_and_lengths_are_bounded() {
    let header = |n_tensors: u64, n_kv: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b
    };
    let err = GgufHeader::parse(&header(0, u64::MAX)).unwrap_err();
    assert!(matches!(err, GgufError::ImplausibleCount { .. }), "{err}");
    let err = GgufHeader::parse(&header(u64::MAX / 2, 0)).unwrap_err();
    assert!(matches!(err, GgufError::ImplausibleCount { .. }), "{err}");

    // A string that claims to be longer than the file.
    let mut b = header(0, 1);
    b.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let err = GgufHeader::parse(&b).unwrap_err();
    assert!(matches!(err, GgufError::ImplausibleCount { .. }), "{err}");

    // An array that claims 2^62 elements.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let err = GgufHeader::parse(&b).unwrap_err();
    assert!(err.to_string().contains("array length"), "{err}");

    // Unknown value type, and invalid UTF-8 in a key.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&99u32.to_le_bytes());
    let err = GgufHeader::parse(&b).unwrap_err();
    assert!(
        matches!(err, GgufError::UnknownValueType { type_id: 99, .. }),
        "{err}"
    );
    let mut b = header(0, 1);
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&[0xff, 0xfe]);
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    let err = GgufHeader::parse(&b).unwrap_err();
    assert!(matches!(err, GgufError::InvalidUtf8 { .. }), "{err}");

    // Arrays nested without end.
    let mut b = header(0, 1);
    put_str(&mut b, "deep");
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..64 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    b.extend_from_slice(&[0u8; 64]);
    let err = GgufHeader::parse(&b).unwrap_err();
    assert!(matches!(err, GgufError::NestingTooDeep { .. }), "{err}");
}

fn one_tensor(dims: Vec<u64>, type_id: u32, data: Vec<u8>, kv: Vec<(&str, V)>) -> Vec<u8> {
    write_gguf(
        &kv,
        &[Tensor {
            name: "w",
            dims,
            type_id,
            data,
        }],
        32,
    )
}

#[test]
fn bad_tensor_descriptions_are_named() {
    let err = GgufHeader::parse(&one_tensor(vec![4], 16, vec![0; 16], vec![])).unwrap_err();
    assert!(
        matches!(err, GgufError::UnknownTensorType { type_id: 16, .. }),
        "{err}"
    );
    let err = GgufHeader::parse(&one_tensor(vec![4], 77, vec![0; 16], vec![])).unwrap_err();
    assert!(err.to_string().contains("\"w\""), "{err}");
    let err = GgufHeader::parse(&one_tensor(vec![0, 4], 0, vec![], vec![])).unwrap_err();
    assert!(matches!(err, GgufError::BadShape { .. }), "{err}");
    let err =
        GgufHeader::parse(&one_tensor(vec![1 << 40, 1 << 40], 0, vec![], vec![])).unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
    let err = GgufHeader::parse(&one_tensor(vec![16], 8, vec![0; 34], vec![])).unwrap_err();
    assert!(
        err.to_string().contains("multiple of the Q8_0 block"),
        "{err}"
    );
    let err =
        GgufHeader::parse(&one_tensor(vec![1, 1, 1, 1, 1], 0, vec![0; 4], vec![])).unwrap_err();
    assert!(matches!(err, GgufError::BadShape { .. }), "{err}");
    // A claimed size larger than the data present.
    let err = GgufHeader::parse(&one_tensor(vec![1000], 0, vec![0; 16], vec![])).unwrap_err();
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
    let err = GgufHeader::parse(&one_tensor(
        vec![4],
        0,
        vec![0; 16],
        vec![("general.alignment", V::U32(3))],
    ))
    .unwrap_err();
    assert!(matches!(err, GgufError::BadAlignment { .. }), "{err}");
    let err = GgufHeader::parse(&one_tensor(
        vec![4],
        0,
        vec![0; 16],
        vec![("general.alignment", V::Str("x"))],
    ))
    .unwrap_err();
    assert!(matches!(err, GgufError::BadAlignment { .. }), "{err}");

    // Misaligned offset and duplicate names.
    let mut b = one_tensor(vec![4], 0, vec![0; 64], vec![]);
    // magic, version, counts, name, n_dims, one dim, type, then the offset.
    let header_len = 4 + 4 + 8 + 8 + (8 + 1) + 4 + 8 + 4 + 8;
    b[header_len - 8] = 4;
    let err = GgufHeader::parse(&b).unwrap_err();
    assert!(err.to_string().contains("alignment"), "{err}");
    let dup = write_gguf(
        &[],
        &[
            Tensor {
                name: "w",
                dims: vec![4],
                type_id: 0,
                data: vec![0; 16],
            },
            Tensor {
                name: "w",
                dims: vec![4],
                type_id: 0,
                data: vec![0; 16],
            },
        ],
        32,
    );
    let err = GgufHeader::parse(&dup).unwrap_err();
    assert!(matches!(err, GgufError::DuplicateTensor { .. }), "{err}");
}

#[test]
fn random_corruption_never_panics() {
    let (bytes, _) = sample_file(32);
    let mut seed = 99u64;
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..(1 + lcg(&mut seed) % 4) {
            let at = lcg(&mut seed) as usize % b.len();
            b[at] = lcg(&mut seed) as u8;
        }
        if let Ok(h) = GgufHeader::parse(&b) {
            for t in &h.tensors {
                let data = qvl_model::gguf::tensor_slice(&b, &h, t);
                let mut out = vec![0f32; t.n_elems() as usize];
                if t.ty.can_dequantize() {
                    dequantize(t.ty, data, &mut out).unwrap();
                }
            }
        }
    }
}

#[test]
fn hyperparams_and_rope_unpermute() {
    let kv = vec![
        ("general.architecture", V::Str("llama")),
        ("llama.block_count", V::U32(2)),
        ("llama.context_length", V::U32(128)),
        ("llama.embedding_length", V::U32(8)),
        ("llama.feed_forward_length", V::U32(16)),
        ("llama.attention.head_count", V::U32(2)),
        ("llama.attention.head_count_kv", V::U32(1)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        (
            "tokenizer.ggml.tokens",
            V::Arr(8, vec![V::Str("a"), V::Str("b"), V::Str("c")]),
        ),
    ];
    let b = write_gguf(
        &kv,
        &[Tensor {
            name: "token_embd.weight",
            dims: vec![8, 3],
            type_id: 0,
            data: vec![0; 96],
        }],
        32,
    );
    let hp = LlamaHyperparams::from_header(&GgufHeader::parse(&b).unwrap()).unwrap();
    assert_eq!(
        (hp.n_layers, hp.hidden_size, hp.intermediate_size),
        (2, 8, 16)
    );
    assert_eq!(
        (hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.rope_dim),
        (2, 1, 4, 4)
    );
    assert_eq!((hp.vocab_size, hp.context_length), (3, 128));
    assert!((hp.rms_norm_eps - 1e-5).abs() < 1e-9 && hp.rope_theta == 10000.0);
    assert!(hp.tied_embeddings && hp.qk_rows_permuted);
    assert!(hp.rope_sections.is_empty());

    // A qwen3vl-style header: explicit head_dim, M-RoPE sections, untied output, no q/k permutation.
    let kv = vec![
        ("general.architecture", V::Str("qwen3vl")),
        ("qwen3vl.block_count", V::U32(28)),
        ("qwen3vl.context_length", V::U32(262144)),
        ("qwen3vl.embedding_length", V::U32(2048)),
        ("qwen3vl.feed_forward_length", V::U32(6144)),
        ("qwen3vl.attention.head_count", V::U32(16)),
        ("qwen3vl.attention.head_count_kv", V::U32(8)),
        ("qwen3vl.attention.key_length", V::U32(128)),
        ("qwen3vl.rope.freq_base", V::F32(5_000_000.0)),
        (
            "qwen3vl.rope.dimension_sections",
            V::Arr(5, vec![V::I32(24), V::I32(20), V::I32(20), V::I32(0)]),
        ),
        ("qwen3vl.attention.layer_norm_rms_epsilon", V::F32(1e-6)),
        ("qwen3vl.vocab_size", V::U32(151936)),
    ];
    let b = write_gguf(
        &kv,
        &[Tensor {
            name: "output.weight",
            dims: vec![4],
            type_id: 0,
            data: vec![0; 16],
        }],
        32,
    );
    let hp = LlamaHyperparams::from_header(&GgufHeader::parse(&b).unwrap()).unwrap();
    assert_eq!(
        (hp.head_dim, hp.rope_dim, hp.n_kv_heads, hp.vocab_size),
        (128, 128, 8, 151936)
    );
    assert_eq!(hp.rope_sections, [24, 20, 20, 0]);
    assert!(!hp.tied_embeddings && !hp.qk_rows_permuted);
    assert_eq!(hp.rope_theta, 5_000_000.0);

    // The permutation convert_hf_to_gguf.py applies: reshape (heads, 2, hd/2, cols),
    // swap axes 1 and 2. Un-permuting must give back the Hugging Face rows.
    let (heads, hd, cols) = (3usize, 6usize, 2usize);
    let hf: Vec<f32> = (0..heads * hd * cols).map(|i| i as f32).collect();
    let mut gguf = vec![0f32; hf.len()];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + half * hd / 2 + i;
                let dst = h * hd + i * 2 + half;
                gguf[dst * cols..dst * cols + cols]
                    .copy_from_slice(&hf[src * cols..src * cols + cols]);
                assert_eq!(hf_row_of_gguf_row(dst, hd), src);
            }
        }
    }
    let bytes: Vec<u8> = gguf.iter().flat_map(|v| v.to_le_bytes()).collect();
    let back = unpermute_qk_rows(&bytes, cols * 4, heads, hd).unwrap();
    let back: Vec<f32> = back
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(back, hf);
    assert!(unpermute_qk_rows(&bytes, cols * 4, heads, hd + 1).is_err());
    assert!(unpermute_qk_rows(&bytes, 0, heads, hd).is_err());
}
