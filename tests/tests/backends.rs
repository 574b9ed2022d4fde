//! Every compiled backend runs the same tiny models (GQA and MHA, tied and untied, uniform and
//! non-uniform layers) and agrees with the ndarray reference: logits within 1e-4, and the loss
//! and gradients of a training step too. With `--features wgpu` this covers wgpu (Mesa's
//! software Vulkan in CI).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use shears_core::model_files::check_weights;
use shears_core::{DType, LayerShape, LlamaConfig, WeightMap};
use shears_models::{dispatch, dispatch_autodiff, load, AutodiffTask, BackendKind, BackendTask};
use shears_tests::{max_abs_diff, rel_l2};
use shears_trainer::{AdamWSettings, LmStage, Stage};

struct Case {
    name: &'static str,
    config: LlamaConfig,
    layers: Vec<LayerShape>,
}

fn config(heads: usize, kv: usize, tied: bool) -> LlamaConfig {
    LlamaConfig::from_json_str(&format!(
        r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":96,"hidden_size":32,"intermediate_size":48,
        "num_hidden_layers":2,"num_attention_heads":{heads},"num_key_value_heads":{kv},"head_dim":8,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":{tied}}}"#
    ))
    .unwrap()
}

fn cases() -> Vec<Case> {
    let gqa = config(4, 2, false);
    let mha = config(4, 4, true);
    let mut llama3 = config(4, 1, true);
    llama3.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}));
    let ragged = config(4, 2, false);
    let ragged_layers = vec![
        LayerShape {
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 48,
        },
        LayerShape {
            num_attention_heads: 2,
            num_key_value_heads: 1,
            intermediate_size: 20,
        },
    ];
    vec![
        Case {
            name: "gqa-untied",
            layers: gqa.uniform_layer_shapes(),
            config: gqa,
        },
        Case {
            name: "mha-tied",
            layers: mha.uniform_layer_shapes(),
            config: mha,
        },
        Case {
            name: "mqa-tied-llama3-rope",
            layers: llama3.uniform_layer_shapes(),
            config: llama3,
        },
        Case {
            name: "non-uniform",
            config: ragged,
            layers: ragged_layers,
        },
    ]
}

fn batch_ids() -> Vec<Vec<u32>> {
    (0..2)
        .map(|r| (0..12).map(|c| ((r * 12 + c) * 37 + 5) % 96).collect())
        .collect()
}

fn batch<B: Backend>(device: &B::Device) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = batch_ids().concat().into_iter().map(i64::from).collect();
    Tensor::from_data(TensorData::new(ids, [2, 12]), device)
}

struct Forward<'a> {
    config: &'a LlamaConfig,
    layers: &'a [LayerShape],
    weights: &'a WeightMap,
}

impl BackendTask for Forward<'_> {
    type Output = Vec<f32>;
    fn run<B: shears_models::ShearsOps>(self, device: B::Device) -> Vec<f32> {
        let model =
            load::build::<B>(self.config, self.layers, self.weights, &device, DType::F32).unwrap();
        model
            .forward(batch::<B>(&device))
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap()
    }
}

struct Step<'a> {
    config: &'a LlamaConfig,
    layers: &'a [LayerShape],
    weights: &'a WeightMap,
}

impl AutodiffTask for Step<'_> {
    type Output = (f32, WeightMap);
    fn run<B: shears_models::ShearsAutodiff>(self, device: B::Device) -> Self::Output {
        let model =
            load::build::<B>(self.config, self.layers, self.weights, &device, DType::F32).unwrap();
        let mut stage = LmStage::from_model(model, AdamWSettings::default());
        let loss = stage.backward(&[batch_ids()], 0, &[0]).lm;
        (loss as f32, stage.gradients())
    }
}

#[test]
fn every_backend_agrees_with_ndarray() {
    let compiled = BackendKind::compiled();
    eprintln!("compiled backends: {compiled:?}");
    for case in cases() {
        let weights = load::random_weights_for(&case.config, &case.layers, 11);
        check_weights(&case.config, &weights, std::path::Path::new("<test>")).unwrap();
        let fwd = || Forward {
            config: &case.config,
            layers: &case.layers,
            weights: &weights,
        };
        let step = || Step {
            config: &case.config,
            layers: &case.layers,
            weights: &weights,
        };
        let reference = dispatch(BackendKind::NdArray, fwd()).unwrap();
        let (ref_loss, ref_grads) = dispatch_autodiff(BackendKind::NdArray, step()).unwrap();
        assert!(reference.iter().all(|x| x.is_finite()));
        for &kind in &compiled {
            let logits = dispatch(kind, fwd()).unwrap();
            let d = max_abs_diff(&logits, &reference);
            let (loss, grads) = dispatch_autodiff(kind, step()).unwrap();
            let worst_grad = ref_grads
                .iter()
                .map(|(n, g)| rel_l2(&grads[n].to_f32_vec(), &g.to_f32_vec()))
                .fold(0f64, f64::max);
            eprintln!("{:<22} {kind:<8} max|dlogit| {d:.2e}  |dloss| {:.2e}  worst grad rel {worst_grad:.2e}",
                case.name, (loss - ref_loss).abs());
            assert!(d <= 1e-4, "{} on {kind}: logits differ by {d}", case.name);
            assert!(
                (loss - ref_loss).abs() <= 1e-4,
                "{} on {kind}: loss {loss} vs {ref_loss}",
                case.name
            );
            assert!(
                worst_grad <= 1e-3,
                "{} on {kind}: gradients differ ({worst_grad})",
                case.name
            );
        }
    }
}

#[test]
fn half_precision_runs_where_supported_and_is_refused_where_not() {
    struct Half<'a>(&'a LlamaConfig, &'a WeightMap);
    impl BackendTask for Half<'_> {
        type Output = Result<Vec<f32>, String>;
        fn run<B: shears_models::ShearsOps>(self, device: B::Device) -> Self::Output {
            let layers = self.0.uniform_layer_shapes();
            let model = load::build::<B>(self.0, &layers, self.1, &device, DType::BF16)
                .map_err(|e| e.to_string())?;
            Ok(model
                .forward(batch::<B>(&device))
                .cast(burn::tensor::DType::F32)
                .into_data()
                .into_vec()
                .unwrap())
        }
    }
    let cfg = config(4, 2, true);
    let weights = load::random_weights(&cfg, 3);
    let f32_logits = dispatch(
        BackendKind::NdArray,
        Forward {
            config: &cfg,
            layers: &cfg.uniform_layer_shapes(),
            weights: &weights,
        },
    )
    .unwrap();
    let err = dispatch(BackendKind::NdArray, Half(&cfg, &weights))
        .unwrap()
        .unwrap_err();
    assert!(err.contains("does not support BF16"), "{err}");
    if BackendKind::Flex.is_compiled() {
        let bf16 = dispatch(BackendKind::Flex, Half(&cfg, &weights))
            .unwrap()
            .unwrap();
        let d = max_abs_diff(&bf16, &f32_logits);
        let scale = f32_logits.iter().fold(0f32, |a, x| a.max(x.abs()));
        eprintln!("flex bf16 vs f32: max|d| {d:.3e} (max|logit| {scale:.3e})");
        assert!(
            d <= 0.05 * scale.max(1.0),
            "bf16 logits too far from f32: {d}"
        );
    }
}
