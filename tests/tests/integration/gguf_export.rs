//! GGUF export: Shears' own importer reads back what the exporter writes (f32 bit for bit,
//! quantised types as exactly the blocks llama.cpp's reference rounding gives), the tokenizer
//! metadata survives a round trip, scores agree, and bad requests leave nothing behind.

use shears_core::formats::dequant::{dequantize, GgmlType};
use shears_core::formats::gguf::{GgufFile, Value};
use shears_core::formats::quantize;
use shears_core::gguf_export::{write_llama_gguf, GgufQuant};
use shears_core::{DType, ModelFiles};
use shears_models::backend::NdArrayBackend;
use shears_models::{generate, load};
use shears_tests::{smollm2_gguf, tiny_gguf_model, write_gguf};

type B = NdArrayBackend;

fn tiny(dir: &std::path::Path) -> (std::path::PathBuf, ModelFiles) {
    let (meta, tensors) = tiny_gguf_model();
    let p = dir.join("tiny.gguf");
    write_gguf(&p, &meta, &tensors, None);
    let files = ModelFiles::load(&p).unwrap();
    (p, files)
}

fn mean_nll(files: &ModelFiles, ids: &[u32]) -> f64 {
    let model = load::from_files::<B>(files, &Default::default(), DType::F32).unwrap();
    generate::score(&model, ids).mean_nll()
}

/// The `tokenizer.*` metadata of a GGUF file, with the keys the exporter derives rather than
/// copies (`pre` is absent from the hand-written source) left out.
fn tokenizer_keys(g: &GgufFile) -> Vec<(String, Value)> {
    g.metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer.") && !k.ends_with(".pre"))
        .filter(|(k, _)| !k.ends_with("add_bos_token") && !k.ends_with("add_eos_token"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `token_type` values as i64 (a hand-written file may use another integer width).
fn normalised(kv: Vec<(String, Value)>) -> Vec<(String, Value)> {
    kv.into_iter()
        .map(|(k, v)| match v {
            Value::Array(a) if a.iter().all(|x| x.as_i64().is_some()) => (
                k,
                Value::Array(a.iter().map(|x| Value::I64(x.as_i64().unwrap())).collect()),
            ),
            Value::U32(x) => (k, Value::I64(x as i64)),
            other => (k, other),
        })
        .collect()
}

#[test]
fn f32_export_round_trips_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, files) = tiny(tmp.path());
    let out = tmp.path().join("out.gguf");
    let report = write_llama_gguf(&files, GgufQuant::F32, "tiny", &out, false).unwrap();
    assert!(report.fallbacks.is_empty());
    assert_eq!(report.tensors_by_type["F32"], files.weights.len());
    let back = ModelFiles::load(&out).unwrap();
    assert_eq!(
        back.config.to_json_string().unwrap(),
        files.config.to_json_string().unwrap()
    );
    assert_eq!(back.weights.len(), files.weights.len());
    for (name, t) in &files.weights {
        assert!(back.weights[name].bit_eq(t), "{name} differs");
    }
    // The tokenizer metadata is what the source file held.
    let (g0, g1) = (GgufFile::open(&src).unwrap(), GgufFile::open(&out).unwrap());
    assert_eq!(
        normalised(tokenizer_keys(&g1)),
        normalised(tokenizer_keys(&g0))
    );
    assert_eq!(
        g1.get("tokenizer.ggml.pre").and_then(|v| v.as_str()),
        Some("gpt-2")
    );
    assert_eq!(
        g1.get("general.architecture").and_then(|v| v.as_str()),
        Some("llama")
    );
    assert_eq!(
        g1.get("general.alignment").and_then(|v| v.as_u64()),
        Some(32)
    );
    assert_eq!(
        g1.get("general.file_type").and_then(|v| v.as_u64()),
        Some(0)
    );
    assert_eq!(
        g1.get("llama.attention.head_count_kv")
            .and_then(|v| v.as_u64()),
        Some(2)
    );
    assert_eq!(
        g1.get("llama.rope.dimension_count")
            .and_then(|v| v.as_u64()),
        Some(8)
    );
    // Same text, same ids, same scores.
    let (t0, t1) = (
        files.tokenizer.as_ref().unwrap(),
        back.tokenizer.as_ref().unwrap(),
    );
    let text = "the theory then, the thin thread";
    let ids = t0.encode(text, false).unwrap();
    assert_eq!(t1.encode(text, false).unwrap(), ids);
    assert_eq!(mean_nll(&files, &ids), mean_nll(&back, &ids));
}

#[test]
fn quantised_exports_hold_reference_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, files) = tiny(tmp.path());
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 262) as u32).collect();
    let base = mean_nll(&files, &ids);
    for (quant, ty, tol) in [
        (GgufQuant::F16, GgmlType::F16, 1e-4),
        (GgufQuant::BF16, GgmlType::BF16, 1e-3),
        (GgufQuant::Q8_0, GgmlType::Q8_0, 2e-3),
        (GgufQuant::Q4_0, GgmlType::Q4_0, 5e-2),
        (GgufQuant::Q4_1, GgmlType::Q4_1, 5e-2),
    ] {
        let out = tmp.path().join(format!("{quant:?}.gguf"));
        write_llama_gguf(&files, quant, "tiny", &out, false).unwrap();
        let g = GgufFile::open(&out).unwrap();
        let back = ModelFiles::load(&out).unwrap();
        for t in &g.tensors {
            // Norms stay f32; matrices take the requested type.
            let want = if t.dims.len() == 1 { GgmlType::F32 } else { ty };
            assert_eq!(t.ggml_type, want, "{}", t.name);
        }
        // Each matrix (in GGUF layout) is exactly the reference quantisation of the source's.
        let q = g.tensor_info("blk.1.ffn_up.weight").unwrap();
        let src = files.weights["model.layers.1.mlp.up_proj.weight"].to_f32_vec();
        let mut bytes = vec![];
        quantize::encode(ty, &src, &mut bytes);
        assert_eq!(g.raw(q), &bytes[..], "{quant:?}");
        let dq = dequantize(ty, &bytes, src.len()).unwrap();
        assert_eq!(
            back.weights["model.layers.1.mlp.up_proj.weight"].to_f32_vec(),
            dq
        );
        let nll = mean_nll(&back, &ids);
        assert!(
            (nll - base).abs() <= tol * base,
            "{quant:?}: mean NLL {nll} vs {base}"
        );
    }
}

#[test]
fn rows_that_are_not_whole_blocks_fall_back_to_f16() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut files) = tiny(tmp.path());
    // Cut the MLP to 48 channels: down_proj rows (48 long) are not whole 32-blocks.
    for l in 0..files.layers.len() {
        for (name, rows) in [("gate_proj", true), ("up_proj", true), ("down_proj", false)] {
            let key = format!("model.layers.{l}.mlp.{name}.weight");
            let t = &files.weights[&key];
            let (r, c) = (t.shape[0], t.shape[1]);
            let v = t.to_f32_vec();
            let cut = if rows {
                shears_core::HostTensor::f32(vec![48, c], v[..48 * c].to_vec())
            } else {
                let data = (0..r).flat_map(|i| v[i * c..i * c + 48].to_vec()).collect();
                shears_core::HostTensor::f32(vec![r, 48], data)
            };
            files.weights.insert(key, cut);
        }
        files.layers[l].intermediate_size = 48;
    }
    files.config.intermediate_size = 48;
    let out = tmp.path().join("q.gguf");
    let report = write_llama_gguf(&files, GgufQuant::Q8_0, "cut", &out, false).unwrap();
    assert_eq!(
        report.fallbacks,
        vec!["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    );
    assert!(report.warnings.iter().any(|w| w.contains("stored as F16")));
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(
        g.tensor_info("blk.0.ffn_down.weight").unwrap().ggml_type,
        GgmlType::F16
    );
    let back = ModelFiles::load(&out).unwrap();
    assert_eq!(back.config.intermediate_size, 48);
}

#[test]
fn bad_requests_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, files) = tiny(tmp.path());
    let out = tmp.path().join("out.gguf");
    // The model file itself as the output.
    let e = write_llama_gguf(&files, GgufQuant::F32, "t", &src, true).unwrap_err();
    assert!(e.to_string().contains("tiny.gguf"), "{e}");
    // A directory that holds the model, and one that does not.
    let e = write_llama_gguf(&files, GgufQuant::F32, "t", tmp.path(), true).unwrap_err();
    assert!(e.to_string().contains("contains the model"), "{e}");
    let sub = tmp.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let e = write_llama_gguf(&files, GgufQuant::F32, "t", &sub, true).unwrap_err();
    assert!(e.to_string().contains("directory"), "{e}");
    std::fs::remove_dir(&sub).unwrap();
    // No tokenizer.
    let mut no_tok = files.clone();
    no_tok.tokenizer = None;
    let e = write_llama_gguf(&no_tok, GgufQuant::F32, "t", &out, false).unwrap_err();
    assert!(e.to_string().contains("tokenizer"), "{e}");
    // A tensor missing from the weights.
    let mut missing = files.clone();
    missing
        .weights
        .remove("model.layers.1.self_attn.k_proj.weight");
    let e = write_llama_gguf(&missing, GgufQuant::F32, "t", &out, false).unwrap_err();
    assert!(e.to_string().contains("k_proj"), "{e}");
    assert!(!out.exists());
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // An existing file is replaced only when asked.
    write_llama_gguf(&files, GgufQuant::F32, "t", &out, false).unwrap();
    let e = write_llama_gguf(&files, GgufQuant::Q8_0, "t", &out, false).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    write_llama_gguf(&files, GgufQuant::Q8_0, "t", &out, true).unwrap();
    assert_eq!(
        GgufFile::open(&out)
            .unwrap()
            .get("general.file_type")
            .and_then(|v| v.as_u64()),
        Some(7)
    );
}

/// SmolLM2-135M: the real tokenizer (49k byte-level BPE, SmolLM pre-tokenizer, chat template)
/// and the real model through f32 and Q8_0.
#[test]
fn smollm2_exports_and_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let src = smollm2_gguf();
    let files = ModelFiles::load(&src).unwrap();
    let out = tmp.path().join("smollm2.gguf");
    write_llama_gguf(&files, GgufQuant::F32, "SmolLM2-135M-Instruct", &out, false).unwrap();
    let (g0, g1) = (GgufFile::open(&src).unwrap(), GgufFile::open(&out).unwrap());
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
        "llama.context_length",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
    ] {
        assert_eq!(g1.get(key), g0.get(key), "{key}");
    }
    let types = |g: &GgufFile| -> Vec<i64> {
        g.get("tokenizer.ggml.token_type")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    };
    assert_eq!(types(&g1), types(&g0));
    let back = ModelFiles::load(&out).unwrap();
    for (name, t) in &files.weights {
        assert!(back.weights[name].bit_eq(t), "{name} differs");
    }
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shears_tests::fixture("smollm2/tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let tok = back.tokenizer.as_ref().unwrap();
    for c in cases["cases"].as_array().unwrap() {
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(c["text"].as_str().unwrap(), false).unwrap(),
            want,
            "{}",
            c["text"]
        );
    }
    let ids = tok
        .encode(
            "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
            false,
        )
        .unwrap();
    let base = mean_nll(&files, &ids);
    assert_eq!(mean_nll(&back, &ids), base);
    std::fs::remove_file(&out).unwrap();
    let q8 = tmp.path().join("smollm2-q8_0.gguf");
    write_llama_gguf(&files, GgufQuant::Q8_0, "SmolLM2-135M-Instruct", &q8, false).unwrap();
    let nll = mean_nll(&ModelFiles::load(&q8).unwrap(), &ids);
    // Q8_0 of weights that were Q4_1 to begin with: a documented 1% tolerance on the mean NLL.
    assert!(
        (nll - base).abs() <= 0.01 * base,
        "q8_0 mean NLL {nll} vs f32 {base}"
    );
    eprintln!("SmolLM2 mean NLL: f32 {base:.5}, q8_0 {nll:.5}");
}

/// A SentencePiece-style tokenizer (byte fallback, BOS, scores): exported metadata rebuilds a
/// tokenizer that encodes like the original, through the merges (Shears' importer) and through
/// the scores alone (what llama.cpp's SentencePiece tokenizer merges by).
#[test]
fn sentencepiece_tokenizer_round_trips() {
    use shears_core::formats::gguf_vocab::tokenizer_metadata;
    use shears_core::formats::gguf_write::write_gguf as write_file;
    let tmp = tempfile::tempdir().unwrap();
    let src = GgufFile::open(shears_tests::spm_gguf(tmp.path())).unwrap();
    let tok = shears_core::Tokenizer::from_gguf(&src).unwrap();
    let mut warnings = vec![];
    let kv = tokenizer_metadata(&tok, tok.vocab_size() + 3, &mut warnings).unwrap();
    assert!(
        warnings.iter().any(|w| w.contains("3 embedding rows")),
        "{warnings:?}"
    );
    let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(
        get("tokenizer.ggml.model"),
        Some(Value::String("llama".into()))
    );
    assert_eq!(get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
    assert_eq!(get("tokenizer.ggml.bos_token_id"), Some(Value::U32(1)));
    assert_eq!(get("tokenizer.ggml.unknown_token_id"), Some(Value::U32(0)));
    let types = get("tokenizer.ggml.token_type").unwrap();
    let types: Vec<i64> = types
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(&types[..4], &[2, 3, 3, 6]); // unknown, control, control, byte
    assert_eq!(&types[types.len() - 3..], &[5, 5, 5]); // padding rows: unused
    let texts = ["hello world", "hello \u{2603}", "world hello  wor", ""];
    for drop_merges in [false, true] {
        let mut meta = kv.clone();
        if drop_merges {
            meta.retain(|(k, _)| k != "tokenizer.ggml.merges");
        }
        meta.insert(
            0,
            ("general.architecture".into(), Value::String("llama".into())),
        );
        let p = tmp.path().join(format!("tok-{drop_merges}.gguf"));
        write_file(&p, false, &meta, &[], |_| unreachable!()).unwrap();
        let back = shears_core::Tokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
        for t in texts {
            assert_eq!(
                back.encode(t, true).unwrap(),
                tok.encode(t, true).unwrap(),
                "{t:?} (merges dropped: {drop_merges})"
            );
        }
    }
}

/// Rope scaling survives the trip for every type the exporter writes: linear as
/// `rope.scaling.*` keys, Llama-3 as the `rope_freqs.weight` divisors llama.cpp reads plus the
/// parameters under `shears.rope.llama3.*` (llama.cpp ignores them; the importer checks they
/// reproduce the divisors), so factors outside the published sets come back too (they were
/// exported with exit 0 and then refused by the importer). Scores agree.
#[test]
fn rope_scaling_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, files) = tiny(tmp.path());
    let ids: Vec<u32> = (0..100).map(|i| (i * 37 % 250) as u32).collect();
    for (i, scaling) in [
        serde_json::json!({"rope_type": "linear", "factor": 4.0}),
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        serde_json::json!({"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0,
            "high_freq_factor": 8.0, "original_max_position_embeddings": 4096}),
        serde_json::json!({"rope_type": "llama3", "factor": 3.5, "low_freq_factor": 0.5,
            "high_freq_factor": 3.0, "original_max_position_embeddings": 32}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = files.clone();
        f.config.rope_scaling = Some(scaling.clone());
        // Llama-3's theta: with head_dim 8, the lowest frequency then lies past the
        // low-frequency wavelength, so the divisors pin down every parameter.
        f.config.rope_theta = Some(500000.0);
        let out = tmp.path().join(format!("rope{i}.gguf"));
        write_llama_gguf(&f, GgufQuant::F32, "t", &out, false).unwrap();
        let g = GgufFile::open(&out).unwrap();
        assert_eq!(g.tensor_info("rope_freqs.weight").is_some(), i >= 1);
        let back = ModelFiles::load(&out).unwrap();
        assert_eq!(back.config.rope_scaling, Some(scaling.clone()));
        assert_eq!(
            back.config.rope().unwrap().scaling,
            f.config.rope().unwrap().scaling
        );
        let (a, b) = (mean_nll(&f, &ids), mean_nll(&back, &ids));
        assert!((a - b).abs() < 1e-5, "{scaling}: {a} vs {b}");
    }
}
