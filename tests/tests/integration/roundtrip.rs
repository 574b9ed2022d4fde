//! GGUF -> import -> export -> import keeps every tensor bit-identical and every score identical;
//! the exported directory is a plain HF LlamaForCausalLM directory.

use shears_core::{DType, HostTensor, ModelFiles};
use shears_models::backend::NdArrayBackend;
use shears_models::{generate, load};
use shears_tests::smollm2_gguf;

type B = NdArrayBackend;

fn assert_same_weights(a: &ModelFiles, b: &ModelFiles) {
    assert_eq!(a.weights.len(), b.weights.len());
    for (name, t) in &a.weights {
        let u: &HostTensor = &b.weights[name];
        assert!(t.bit_eq(u), "{name} differs after the round trip");
    }
}

#[test]
fn gguf_import_export_import_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = ModelFiles::load(smollm2_gguf()).unwrap();

    // import: GGUF -> HF directory
    let imported_dir = gguf
        .write_hf_dir(tmp.path().join("imported"), None, false)
        .unwrap();
    let imported = ModelFiles::load(&imported_dir).unwrap();
    assert_same_weights(&gguf, &imported);
    assert_eq!(imported.config.rope().unwrap(), gguf.config.rope().unwrap());

    // export: through the burn model and back out
    let device = Default::default();
    let model = load::from_files::<B>(&imported, &device, DType::F32).unwrap();
    let mut exported = imported.clone();
    exported.weights = load::to_weights(&model, DType::F32);
    let exported_dir = exported
        .write_hf_dir(tmp.path().join("exported"), None, false)
        .unwrap();

    // import again
    let again = ModelFiles::load(&exported_dir).unwrap();
    assert_same_weights(&gguf, &again);

    // identical tokenization and scores from the GGUF and from the round-tripped directory
    let text = "Once upon a time, there was a little girl who lived in a small village.";
    let ids_a = gguf.tokenizer().unwrap().encode(text, true).unwrap();
    let ids_b = again.tokenizer().unwrap().encode(text, true).unwrap();
    assert_eq!(ids_a, ids_b);
    let sa = generate::score(
        &load::from_files::<B>(&gguf, &device, DType::F32).unwrap(),
        &ids_a,
    );
    let sb = generate::score(
        &load::from_files::<B>(&again, &device, DType::F32).unwrap(),
        &ids_b,
    );
    assert_eq!(sa.nll, sb.nll);
    assert_eq!(sa.last_logits, sb.last_logits);

    // the directory is what transformers expects
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(exported_dir.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["num_key_value_heads"], 3);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["rope_parameters"]["rope_type"], "default");
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(exported_dir.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(tc["eos_token"], "<|im_end|>");

    // bf16 export halves the file and reloads as bf16
    let bf = again
        .write_hf_dir(tmp.path().join("bf16"), Some(DType::BF16), false)
        .unwrap();
    let bf = ModelFiles::load(&bf).unwrap();
    assert!(bf.weights.values().all(|t| t.dtype() == DType::BF16));
}
