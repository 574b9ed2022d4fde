//! Model families against transformers on tiny models whose weights both sides compute from a
//! formula (`tests/fixtures/gen_families.py`): the same token ids, mean NLL within 1e-4, every
//! token within 1e-3, on the fused CPU kernels (flex) and the generic path (ndarray); and the
//! KV cache continuing a sequence past the window as the whole sequence does.

use burn::tensor::{Int, Tensor, TensorData};
use shears_core::DType;
use shears_models::backend::{FlexBackend, NdArrayBackend};
use shears_models::{generate, load, Llama, ShearsOps};
use shears_tests::families;

fn parity<B: ShearsOps>(family: &str) -> f64 {
    let files = families::model(family);
    let fx = families::fixture(family);
    let tok = files.tokenizer().unwrap();
    let model: Llama<B> = load::from_files::<B>(&files, &Default::default(), DType::F32).unwrap();
    let mut worst = 0.0f64;
    for t in fx["texts"].as_array().unwrap() {
        let ids = tok.encode(t["text"].as_str().unwrap(), false).unwrap();
        let want: Vec<u32> = t["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want, "{family}: token ids");
        let s = generate::score(&model, &ids);
        let mean = t["mean_nll"].as_f64().unwrap();
        assert!(
            (s.mean_nll() - mean).abs() <= 1e-4,
            "{family}: mean NLL {} vs transformers {mean} (regenerate with {})",
            s.mean_nll(),
            families::generator().display()
        );
        for (i, (a, b)) in s.nll.iter().zip(t["nll"].as_array().unwrap()).enumerate() {
            let d = (*a as f64 - b.as_f64().unwrap()).abs();
            worst = worst.max(d);
            assert!(d <= 1e-3, "{family}: token {i}: {a} vs {b}");
        }
    }
    worst
}

/// The logits of the last position through the KV cache, the sequence fed in `chunks`, against
/// the whole sequence at once.
fn cache_matches_whole<B: ShearsOps>(family: &str, chunks: &[usize]) {
    let files = families::model(family);
    let model: Llama<B> = load::from_files::<B>(&files, &Default::default(), DType::F32).unwrap();
    let tok = files.tokenizer().unwrap();
    let fx = families::fixture(family);
    let ids = tok
        .encode(fx["texts"][0]["text"].as_str().unwrap(), false)
        .unwrap();
    let total: usize = chunks.iter().sum();
    let ids = &ids[..total];
    let tensor = |x: &[u32]| {
        let v: Vec<i64> = x.iter().map(|&i| i as i64).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, x.len()]), &Default::default())
    };
    let whole = model.logits(model.hidden_states(tensor(ids), None));
    let want: Vec<f32> = whole
        .narrow(1, total - 1, 1)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let mut cache = model.new_cache();
    let mut at = 0;
    let mut last = None;
    for &c in chunks {
        let h = model.hidden_states(tensor(&ids[at..at + c]), Some(&mut cache));
        last = Some(model.logits(h.narrow(1, c - 1, 1)));
        at += c;
    }
    let got: Vec<f32> = last
        .unwrap()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(err < 1e-4, "{family} chunks {chunks:?}: {err}");
}

/// Mistral with a sliding window of 7 over texts of 54 tokens: every query past position 7
/// attends to a window, as transformers' does (a full-attention model scores these texts
/// differently from position 7 on).
#[test]
fn mistral_sliding_window_matches_transformers() {
    let fused = parity::<FlexBackend>("mistral-window");
    let generic = parity::<NdArrayBackend>("mistral-window");
    eprintln!("mistral-window: worst token |dNLL| fused {fused:.2e}, generic {generic:.2e}");
    // Prefill, then single steps past the window; and chunks straddling it.
    cache_matches_whole::<FlexBackend>("mistral-window", &[5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
    cache_matches_whole::<FlexBackend>("mistral-window", &[9, 4, 20]);
    cache_matches_whole::<NdArrayBackend>("mistral-window", &[3, 10, 1, 1, 9]);
}

/// A family survives Shears' own exports: HF keeps the config (architecture, window, layer
/// kinds) and every tensor (Qwen2's biases, q/k norms, Gemma's four norms), GGUF writes
/// llama.cpp's architecture of the family (`qwen2` with its `attn_q.bias` and unpermuted q/k;
/// `qwen3`, `gemma3` with its `1 + w` norms; Mistral as `llama` with the window under
/// `shears.attention.sliding_window`); both read back as the same family and score as the
/// original. The export warns exactly where llama.cpp would run the model differently.
#[test]
fn families_survive_hf_and_gguf_exports() {
    for (family, arch, warning) in [
        ("mistral-window", "llama", Some("sliding window")),
        ("qwen2", "qwen2", None),
        ("qwen2-window", "qwen2", Some("sliding window")),
        ("qwen3", "qwen3", None),
        ("qwen3-window", "qwen3", Some("sliding window")),
        // Layers [local, global, local, local] and query_pre_attn_scalar 24: not llama.cpp's.
        ("gemma3", "gemma3", Some("query_pre_attn_scalar 24")),
        ("gemma3-untied", "gemma3", None),
    ] {
        round_trip(family, arch, warning);
    }
}

fn round_trip(family: &str, arch: &str, warning: Option<&str>) {
    use shears_core::formats::gguf::GgufFile;
    use shears_core::gguf_export::{write_llama_gguf, GgufQuant};
    use shears_core::ModelFiles;
    let tmp = tempfile::tempdir().unwrap();
    let files = families::model(family);
    let ids = files
        .tokenizer()
        .unwrap()
        .encode(
            "one two three four five six seven eight nine ten eleven",
            false,
        )
        .unwrap();
    let mean = |f: &ModelFiles| {
        let m: Llama<FlexBackend> =
            load::from_files::<FlexBackend>(f, &Default::default(), DType::F32).unwrap();
        generate::score(&m, &ids).mean_nll()
    };
    let base = mean(&files);
    let hf = tmp.path().join("hf");
    files.write_hf_dir(&hf, None, false).unwrap();
    let g = tmp.path().join("m.gguf");
    let report = write_llama_gguf(&files, GgufQuant::F32, "m", &g, false).unwrap();
    let meta = GgufFile::open(&g).unwrap();
    assert_eq!(
        meta.get("general.architecture").and_then(|v| v.as_str()),
        Some(arch)
    );
    match warning {
        Some(w) => assert!(
            report.warnings.iter().any(|x| x.contains(w)),
            "{family}: {:?}",
            report.warnings
        ),
        None => assert!(
            report.warnings.is_empty(),
            "{family}: {:?}",
            report.warnings
        ),
    }
    let windows = |c: &shears_core::LlamaConfig| -> Vec<Option<usize>> {
        (0..c.num_hidden_layers)
            .map(|l| c.attention_window(l))
            .collect()
    };
    for p in [hf, g] {
        let back = ModelFiles::load(&p).unwrap();
        let at = p.display();
        assert_eq!(back.config.family(), files.config.family(), "{at}");
        assert_eq!(back.weights.len(), files.weights.len(), "{at}");
        assert_eq!(windows(&back.config), windows(&files.config), "{at}");
        let ropes = |c: &shears_core::LlamaConfig| -> Vec<_> {
            (0..c.num_hidden_layers)
                .map(|l| c.rope_of_layer(l).unwrap())
                .collect()
        };
        assert_eq!(ropes(&back.config), ropes(&files.config), "{at}");
        assert_eq!(
            back.config.attention_scale(),
            files.config.attention_scale()
        );
        let got = mean(&back);
        assert!((got - base).abs() < 1e-5, "{family} {at}: {got} vs {base}");
    }
}

/// Qwen2: q/k/v biases, rope theta 1e6, an untied LM head; and with `use_sliding_window` a
/// window on the layers from `max_window_layers` on (layer 0 full, layer 1 windowed), as
/// `layer_types` says.
#[test]
fn qwen2_matches_transformers() {
    for family in ["qwen2", "qwen2-window"] {
        let fused = parity::<FlexBackend>(family);
        let generic = parity::<NdArrayBackend>(family);
        eprintln!("{family}: worst token |dNLL| fused {fused:.2e}, generic {generic:.2e}");
    }
    let c = families::model("qwen2-window").config;
    assert_eq!(
        (c.attention_window(0), c.attention_window(1)),
        (None, Some(5))
    );
    assert_eq!(families::model("qwen2").config.attention_window(1), None);
    cache_matches_whole::<FlexBackend>("qwen2-window", &[3, 1, 1, 1, 1, 1, 1, 9]);
}

/// Qwen3: per-head RMSNorm on q and k before RoPE, `head_dim` 16 where hidden / heads is 8; and
/// with `use_sliding_window` a windowed second layer and an untied head.
#[test]
fn qwen3_matches_transformers() {
    for family in ["qwen3", "qwen3-window"] {
        let fused = parity::<FlexBackend>(family);
        let generic = parity::<NdArrayBackend>(family);
        eprintln!("{family}: worst token |dNLL| fused {fused:.2e}, generic {generic:.2e}");
    }
    let c = families::model("qwen3").config;
    assert_eq!(
        (c.head_dim(), c.hidden_size / c.num_attention_heads),
        (16, 8)
    );
    cache_matches_whole::<FlexBackend>("qwen3-window", &[4, 1, 1, 1, 1, 1, 1, 9]);
}

/// Gemma 3 text: `x · (1 + w)` norms (four a layer), `sqrt(d)`-scaled embeddings, GELU-tanh,
/// q/k norms, `query_pre_attn_scalar` 24 against head_dim 16, local layers with a window of 6
/// and rope base 1e4 beside global ones with 1e6 (linearly scaled in the untied variant).
#[test]
fn gemma3_matches_transformers() {
    for family in ["gemma3", "gemma3-untied"] {
        let fused = parity::<FlexBackend>(family);
        let generic = parity::<NdArrayBackend>(family);
        eprintln!("{family}: worst token |dNLL| fused {fused:.2e}, generic {generic:.2e}");
    }
    let c = families::model("gemma3").config;
    let kinds: Vec<Option<usize>> = (0..4).map(|l| c.attention_window(l)).collect();
    assert_eq!(kinds, [Some(6), None, Some(6), Some(6)]);
    assert_ne!(c.rope_of_layer(0).unwrap(), c.rope_of_layer(1).unwrap());
    cache_matches_whole::<FlexBackend>("gemma3", &[5, 1, 1, 1, 1, 1, 1, 1, 9]);
    cache_matches_whole::<NdArrayBackend>("gemma3-untied", &[3, 10, 1, 9]);
}
