//! Model-format corners: sharded safetensors with half-precision tensors, GGUF version 2, and
//! the refusal to export per-layer widths that HF's LlamaForCausalLM cannot represent.

use std::collections::BTreeMap;

use shears_core::formats::safetensors;
use shears_core::{DType, LayerShape, LlamaConfig, ModelFiles, WeightMap};
use shears_models::load;
use shears_tests::{tiny_gguf_model, write_gguf};

fn tiny_model(dir: &std::path::Path) -> ModelFiles {
    let (meta, tensors) = tiny_gguf_model();
    let p = dir.join("tiny.gguf");
    write_gguf(&p, &meta, &tensors, None);
    ModelFiles::load(&p).unwrap()
}

#[test]
fn sharded_half_precision_directory_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(tmp.path());
    let dir = files
        .write_hf_dir(tmp.path().join("hf"), None, false)
        .unwrap();
    // Re-shard: layer 0 in bf16 in one file, everything else in f16 in another.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (mut a, mut b) = (WeightMap::new(), WeightMap::new());
    let mut map = serde_json::Map::new();
    for (name, t) in &files.weights {
        if name.starts_with("model.layers.0.") {
            a.insert(name.clone(), t.to_dtype(DType::BF16));
            map.insert(name.clone(), "model-00001-of-00002.safetensors".into());
        } else {
            b.insert(name.clone(), t.to_dtype(DType::F16));
            map.insert(name.clone(), "model-00002-of-00002.safetensors".into());
        }
    }
    safetensors::write(
        dir.join("model-00001-of-00002.safetensors"),
        &a,
        &BTreeMap::new(),
    )
    .unwrap();
    safetensors::write(
        dir.join("model-00002-of-00002.safetensors"),
        &b,
        &BTreeMap::new(),
    )
    .unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let loaded = ModelFiles::load(&dir).unwrap();
    assert_eq!(loaded.weights.len(), files.weights.len());
    for (name, t) in &loaded.weights {
        let want = if name.starts_with("model.layers.0.") {
            DType::BF16
        } else {
            DType::F16
        };
        assert_eq!(t.dtype(), want, "{name}");
        assert!(t.bit_eq(&files.weights[name].to_dtype(want)), "{name}");
    }
    // A missing shard is named.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = ModelFiles::load(&dir).unwrap_err().to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn gguf_version_2_reads_like_version_3() {
    let tmp = tempfile::tempdir().unwrap();
    let v3 = tiny_model(tmp.path());
    let mut bytes = std::fs::read(tmp.path().join("tiny.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let p = tmp.path().join("v2.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let v2 = ModelFiles::load(&p).unwrap();
    assert_eq!(v2.config, v3.config);
    assert!(v2.weights.iter().all(|(n, t)| t.bit_eq(&v3.weights[n])));
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = ModelFiles::load(&p).unwrap_err().to_string();
    assert!(e.contains("unsupported GGUF version 1"), "{e}");
}

#[test]
fn non_uniform_models_run_but_are_not_exported_as_llama() {
    let config = LlamaConfig::from_json_str(
        r#"{"vocab_size":64,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5}"#,
    )
    .unwrap();
    let layers = vec![
        LayerShape {
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 32,
        },
        LayerShape {
            num_attention_heads: 2,
            num_key_value_heads: 1,
            intermediate_size: 8,
        },
    ];
    let weights = load::random_weights_for(&config, &layers, 5);
    let files = ModelFiles {
        layers: shears_core::model_files::check_weights(
            &config,
            &weights,
            std::path::Path::new("x"),
        )
        .unwrap(),
        config,
        weights,
        tokenizer: None,
        source: "x".into(),
    };
    assert_eq!(files.layers, layers);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let e = files
        .write_hf_dir(&out, None, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("per-layer widths") && e.contains("layer 1: 2 heads / 1 kv / 8 mlp"),
        "{e}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing left behind"
    );
}

/// Mistral's sliding window is attended (every layer gets it; contexts past it are no longer
/// refused), a LLaMA config's `sliding_window` is ignored as transformers ignores it, a window
/// of 0 is refused, and the context bound is `max_position_embeddings`.
#[test]
fn mistral_sliding_window_is_attended() {
    let text = r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral","vocab_size":64,
        "hidden_size":16,"intermediate_size":32,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"rms_norm_eps":1e-5,"sliding_window":8}"#;
    let mut config = LlamaConfig::from_json_str(text).unwrap();
    let random = |c: &LlamaConfig| {
        load::random_model::<shears_models::backend::NdArrayBackend>(c, 1, &Default::default())
            .unwrap()
    };
    let model = random(&config);
    assert!(model
        .model
        .layers
        .iter()
        .all(|l| l.self_attn.window == Some(8)));
    assert!(model.check_context(9).is_ok());
    // Without a window the bound is max_position_embeddings (2048 when the config omits it).
    assert!(model.check_context(2048).is_ok());
    let e = model.check_context(2049).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings of 2048"), "{e}");
    assert!(model.check_context(usize::MAX).is_err());
    let llama = LlamaConfig::from_json_str(
        &text
            .replace("MistralForCausalLM", "LlamaForCausalLM")
            .replace("\"mistral\"", "\"llama\""),
    )
    .unwrap();
    assert!(random(&llama)
        .model
        .layers
        .iter()
        .all(|l| l.self_attn.window.is_none()));
    config.sliding_window = Some(0);
    let e = config.validate().unwrap_err();
    assert!(e.contains("sliding_window = 0"), "{e}");
}
