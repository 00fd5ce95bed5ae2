//! The GGUF reader on the real SmolLM2-135M-Instruct Q4_1 file. Skips (and
//! says so) when the model is not fetched; fetch it with
//! `cargo test -p qvl-model --test gguf_fetch -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_model::fetch::{find_cached, SMOLLM2};
use qvl_model::gguf::{GgmlType, GgufFile, LlamaHyperparams};

#[test]
fn reads_smollm2_hyperparameters_and_dequantizes_every_tensor() {
    let Some(path) = find_cached(&SMOLLM2) else {
        eprintln!(
            "SKIPPED: SmolLM2 is not fetched (models cache: $QVL_MODELS_DIR, $XDG_CACHE_HOME/qvl/models \
             or ~/.cache/qvl/models). Fetch it with `cargo test -p qvl-model --test gguf_fetch -- --ignored`."
        );
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let h = file.header();
    assert_eq!(h.version, 3);
    assert_eq!(h.tensors.len(), 272);
    let hp = LlamaHyperparams::from_header(h).unwrap();
    assert_eq!(hp.architecture, "llama");
    assert_eq!(
        (hp.n_layers, hp.hidden_size, hp.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!(
        (hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.rope_dim),
        (9, 3, 64, 64)
    );
    assert_eq!((hp.vocab_size, hp.context_length), (49152, 8192));
    assert_eq!(hp.rope_theta, 100000.0);
    assert!((hp.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert!(hp.tied_embeddings && hp.qk_rows_permuted);
    assert!(hp.rope_sections.is_empty());

    let emb = file.tensor_info("token_embd.weight").unwrap();
    assert_eq!((emb.ty, emb.shape()), (GgmlType::Q8_0, vec![49152, 576]));
    let q = file.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ty, q.shape()), (GgmlType::Q4_1, vec![576, 576]));
    assert_eq!(
        file.tensor_info("blk.0.attn_k.weight").unwrap().shape(),
        vec![192, 576]
    );

    let mut total = 0usize;
    for t in &h.tensors {
        let v = file.dequantize_tensor(&t.name).unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{} has non-finite values",
            t.name
        );
        let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!(
            rms > 1e-4 && rms < 100.0,
            "{}: implausible rms {rms}",
            t.name
        );
        total += v.len();
    }
    println!("dequantized {total} values in {} tensors", h.tensors.len());
}

#[test]
fn tiles_of_rows_and_hf_names() {
    let Some(path) = find_cached(&SMOLLM2) else {
        eprintln!("SKIPPED: SmolLM2 is not fetched; `cargo test -p qvl-model --test gguf_fetch -- --ignored`.");
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let info = file.tensor_info("blk.3.ffn_down.weight").unwrap().clone();
    let whole = file.dequantize_tensor(&info.name).unwrap();
    // Rows 10..13, columns 64..128 (blocks 2 and 3 of each Q4_1 row), tile by tile.
    let rows = file.tensor_rows(&info, 10..13).unwrap();
    let rb = info.row_bytes();
    let block = info.ty.block_bytes();
    for (r, row) in rows.chunks_exact(rb).enumerate() {
        let mut tile = [0f32; 64];
        qvl_model::gguf::dequantize(info.ty, &row[2 * block..4 * block], &mut tile).unwrap();
        let start = (10 + r) * info.row_len() + 64;
        assert_eq!(&tile[..], &whole[start..start + 64]);
    }
    assert!(file.tensor_rows(&info, 0..info.n_rows() + 1).is_err());
    assert_eq!(
        qvl_model::gguf::hf_tensor_name("blk.29.attn_q.weight").as_deref(),
        Some("model.layers.29.self_attn.q_proj.weight")
    );
    for t in &file.header().tensors {
        assert!(
            qvl_model::gguf::hf_tensor_name(&t.name).is_some(),
            "{} has no HF name",
            t.name
        );
    }
}
