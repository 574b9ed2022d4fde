//! Finalize on the real SmolLM2-135M: prune 30 layers / 576 / 9 heads (3 kv) / 1536 to
//! 20 / 384 / 6 heads (3 kv) / 1024 with fixed random masks. The finalized dense model gives the
//! masked model's logits on the shared texts, its config is exactly the target, it exports to an
//! HF directory, and `shears score` on that directory equals the masked model's score.

use std::process::Command;

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::Value;
use shears_core::{DType, ModelFiles};
use shears_models::backend::NdArrayBackend;
use shears_models::generate::ids_tensor;
use shears_models::{load, loss};
use shears_pruning::{finalize, FinalizeOptions, L0Masks, PruningSpec, TargetShape};
use shears_tests::{fixture, smollm2_gguf};

type B = NdArrayBackend;

#[test]
fn smollm2_masked_equals_finalized_and_scores_match() {
    let files = ModelFiles::load(smollm2_gguf()).unwrap();
    let target = TargetShape {
        num_hidden_layers: 20,
        hidden_size: 384,
        num_attention_heads: 6,
        num_key_value_heads: 3,
        intermediate_size: 1024,
    };
    let spec = PruningSpec::new(&files.config, target, None).unwrap();
    let mut rng = StdRng::seed_from_u64(2024);
    let las: shears_pruning::PerModule<Vec<f32>> = spec
        .modules
        .iter()
        .map(|&m| {
            let (rows, n) = spec.mask_shape(m);
            (
                m,
                (0..rows * n)
                    .map(|_| rng.random_range(-3.0f32..5.0))
                    .collect::<Vec<f32>>(),
            )
        })
        .collect();
    let device = Default::default();
    let model = load::from_files::<B>(&files, &device, DType::F32).unwrap();
    let masks = L0Masks::<B>::from_values(&spec, &las, &device);
    let host = masks.deterministic(true);
    let fm = host.to_device::<B>(&device).forward_masks(model.dtype());

    let (cfg, weights) = finalize(&files.weights, &host, FinalizeOptions::default()).unwrap();
    assert_eq!(TargetShape::of(&cfg), target);
    assert!(cfg.tie_word_embeddings);
    let mut pruned = files.clone();
    pruned.config = cfg;
    pruned.layers = pruned.config.uniform_layer_shapes();
    pruned.weights = weights;
    let dense = load::from_files::<B>(&pruned, &device, DType::F32).unwrap();

    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/manifest.json")).unwrap())
            .unwrap();
    let tok = files.tokenizer().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = pruned
        .write_hf_dir(tmp.path().join("pruned"), None, false)
        .unwrap();
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["num_hidden_layers"], 20);
    assert_eq!(written["hidden_size"], 384);
    assert_eq!(written["num_attention_heads"], 6);
    assert_eq!(written["num_key_value_heads"], 3);
    assert_eq!(written["intermediate_size"], 1024);
    assert_eq!(written["head_dim"], 64);

    for name in ["text1_fox", "text2_paris", "text3_story", "code1_fib"] {
        let text = manifest["texts"][name]["text"].as_str().unwrap();
        let ids = tok.encode(text, true).unwrap();
        let t = ids_tensor::<B>(&ids, &device);
        let masked_logits = model.forward_masked(t.clone(), &fm);
        let dense_logits = dense.forward(t.clone());
        let a: Vec<f32> = masked_logits.clone().into_data().into_vec().unwrap();
        let b: Vec<f32> = dense_logits.into_data().into_vec().unwrap();
        let scale = a.iter().fold(1f32, |m, x| m.max(x.abs()));
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: max|masked - finalized| = {d:.2e} (max|logit| {scale:.1})");
        assert!(d <= 1e-4 * scale, "{name}: {d}");

        // `shears score` on the exported directory equals the masked model's score.
        let nll = loss::token_nll(masked_logits, t);
        let masked_mean: f64 = nll
            .mean()
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .unwrap()[0];
        let file = tmp.path().join(format!("{name}.txt"));
        std::fs::write(&file, text).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_shears"))
            .args([
                "score",
                "--model",
                out.to_str().unwrap(),
                "--text-file",
                file.to_str().unwrap(),
                "--json",
                "--backend",
                "ndarray",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let cli_mean = v["mean_nll"].as_f64().unwrap();
        eprintln!("{name}: masked mean NLL {masked_mean:.6}, shears score {cli_mean:.6}");
        assert!(
            (cli_mean - masked_mean).abs() <= 1e-4,
            "{name}: {cli_mean} vs {masked_mean}"
        );
    }
}
