//! Training-step parity with PyTorch (shared tiny-train fixture): five AdamW steps of a tiny GQA
//! LLaMA on a fixed batch. Losses, step-0 gradients and final weights must match, which proves
//! the backward pass and the optimizer.

use burn::backend::Autodiff;
use shears_core::formats::safetensors::SafeTensorsFile;
use shears_core::{DType, ModelFiles};
use shears_models::backend::NdArrayBackend;
use shears_models::load;
use shears_tests::{fixture, read_i64, rel_l2};
use shears_trainer::{AdamWSettings, LmStage, Stage};

#[test]
fn five_adamw_steps_match_pytorch_on_ndarray() {
    five_adamw_steps_match_pytorch::<Autodiff<NdArrayBackend>>();
}

#[test]
fn five_adamw_steps_match_pytorch_on_flex() {
    five_adamw_steps_match_pytorch::<Autodiff<shears_models::backend::FlexBackend>>();
}

fn five_adamw_steps_match_pytorch<AB: shears_models::ShearsAutodiff>() {
    let files = ModelFiles::load(fixture("tiny-train/model")).unwrap();
    assert_eq!(files.layers[0].num_key_value_heads, 2, "fixture is GQA");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-train/expected.json")).unwrap(),
    )
    .unwrap();
    let losses: Vec<f64> = expected["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let norms: Vec<f64> = expected["grad_global_norm"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();

    let device = Default::default();
    let (shape, ids) = read_i64(&fixture("tiny-train/batch.safetensors"), "input_ids");
    let batch: Vec<Vec<u32>> = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect();
    assert_eq!(batch.len(), shape[0]);

    let model = load::from_files::<AB>(&files, &device, DType::F32).unwrap();
    let settings = AdamWSettings {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    // The production step (one micro-batch, no clipping, lr scale 1).
    let mut trainer = LmStage::from_model(model, settings);

    // Step-0 gradients of every parameter.
    let loss0 = trainer.backward(std::slice::from_ref(&batch), 0, &[0]).lm;
    let grads = trainer.gradients();
    let gref = SafeTensorsFile::open(fixture("tiny-train/grads_step0.safetensors")).unwrap();
    assert_eq!(
        grads.len(),
        gref.names().count(),
        "one gradient per parameter"
    );
    let mut sq = 0f64;
    let mut worst_grad = 0f64;
    for (name, g) in &grads {
        let (_, want) = gref.read_f32(&format!("grad0.{name}")).unwrap();
        let got = g.to_f32_vec();
        sq += got.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
        let r = rel_l2(&got, &want);
        worst_grad = worst_grad.max(r);
        assert!(
            r <= 1e-4,
            "step-0 gradient of {name}: relative error {r:.2e}"
        );
    }
    eprintln!("worst relative step-0 gradient error: {worst_grad:.2e}");
    let norm = sq.sqrt();
    assert!(
        (norm - norms[0]).abs() / norms[0] <= 1e-4,
        "grad norm {norm} vs {}",
        norms[0]
    );
    assert!((loss0 - losses[0]).abs() / losses[0] <= 1e-5);
    trainer.apply(1.0);

    for (step, want) in losses.iter().enumerate() {
        let loss = if step == 0 {
            loss0
        } else {
            trainer.step(&batch, step, 0, 1.0).lm
        };
        let rel = (loss - want).abs() / want;
        eprintln!("step {step}: loss {loss:.7} (PyTorch {want:.7}, rel {rel:.1e})");
        assert!(rel <= 1e-5, "step {step}: loss {loss} vs {want}");
    }

    let wref =
        SafeTensorsFile::open(fixture("tiny-train/weights_after_5_steps.safetensors")).unwrap();
    let weights = load::to_weights(trainer.model(), DType::F32);
    assert_eq!(weights.len(), wref.names().count());
    let mut worst = 0f64;
    for (name, w) in &weights {
        let (_, want) = wref.read_f32(&format!("final.{name}")).unwrap();
        let r = rel_l2(&w.to_f32_vec(), &want);
        worst = worst.max(r);
        assert!(r <= 1e-5, "{name} after 5 steps: relative error {r:.2e}");
    }
    eprintln!("worst relative weight error after 5 steps: {worst:.2e}");
}
