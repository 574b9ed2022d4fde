//! Every compiled backend runs the same tiny models (GQA and MHA, tied and untied, uniform and
//! non-uniform layers) and agrees with the ndarray reference: logits within 1e-4, and the loss
//! and gradients of a training step too; and the pruning stage (sampled masks, the Lagrangian,
//! gradients of all three parameter groups, an optimizer step of each) agrees the same way.
//! With `--features wgpu` this covers wgpu (Mesa's software Vulkan in CI), whose cubecl ops are
//! the ones the cuda backend runs; the device check runs it with `--features cuda` on a GPU.

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
    family_config(r#""architectures":["LlamaForCausalLM"]"#, heads, kv, tied)
}

/// The tiny shape with a family's own keys.
fn family_config(keys: &str, heads: usize, kv: usize, tied: bool) -> LlamaConfig {
    LlamaConfig::from_json_str(&format!(
        r#"{{{keys},"vocab_size":96,"hidden_size":32,"intermediate_size":48,
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
    // The other families, windows shorter than the 12-token batch.
    let qwen2 = family_config(
        r#""architectures":["Qwen2ForCausalLM"],"use_sliding_window":true,"sliding_window":5,
        "max_window_layers":1"#,
        4,
        2,
        false,
    );
    let qwen3 = family_config(r#""architectures":["Qwen3ForCausalLM"]"#, 4, 2, true);
    let gemma3 = family_config(
        r#""architectures":["Gemma3ForCausalLM"],"sliding_window":5,"sliding_window_pattern":2,
        "query_pre_attn_scalar":6,"rope_local_base_freq":100.0"#,
        4,
        2,
        true,
    );
    let families = [
        ("qwen2-window", qwen2),
        ("qwen3", qwen3),
        ("gemma3", gemma3),
    ]
    .into_iter()
    .map(|(name, config)| Case {
        name,
        layers: config.uniform_layer_shapes(),
        config,
    });
    let mut cases = vec![
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
    ];
    cases.extend(families);
    cases
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
        let mut stage = LmStage::from_model(model, AdamWSettings::pytorch());
        let loss = stage.backward(&[batch_ids()], 0, &[0]).lm;
        (loss as f32, stage.gradients())
    }
}

/// How close a backend must come to ndarray: (logits, absolute; loss, absolute; gradients,
/// relative L2). The CPU backends and wgpu compute in f32 throughout (measured: logits within
/// 7.5e-8, gradients within 4e-7 on wgpu); cuda's f32 matmuls may run as TF32 (cubecl switches
/// f32 staging to tf32 on tensor-core devices, 10 mantissa bits, about 5e-4 relative per
/// product), so its bounds are those of TF32 sums over these widths.
fn bounds(kind: BackendKind) -> (f32, f64, f64) {
    match kind {
        BackendKind::Cuda => (5e-3, 5e-3, 2e-2),
        _ => (1e-4, 1e-4, 1e-3),
    }
}

#[test]
fn every_backend_agrees_with_ndarray() {
    let compiled = BackendKind::compiled();
    eprintln!("compiled backends: {compiled:?}");
    let mut failures = vec![];
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
                .fold(0f64, |m, r| {
                    if m.is_nan() || r.is_nan() {
                        f64::NAN
                    } else {
                        m.max(r)
                    }
                });
            eprintln!("{:<22} {kind:<8} max|dlogit| {d:.2e}  |dloss| {:.2e}  worst grad rel {worst_grad:.2e}",
                case.name, (loss - ref_loss).abs());
            // Every case is measured and printed before any assertion, so a failing device run
            // still reports all of them.
            let (dl, dloss, dg) = bounds(kind);
            if d.is_nan() || d > dl {
                failures.push(format!("{} on {kind}: logits differ by {d}", case.name));
            }
            if (loss - ref_loss).is_nan() || f64::from((loss - ref_loss).abs()) > dloss {
                failures.push(format!(
                    "{} on {kind}: loss {loss} vs {ref_loss}",
                    case.name
                ));
            }
            if worst_grad.is_nan() || worst_grad > dg {
                failures.push(format!(
                    "{} on {kind}: gradients differ ({worst_grad})",
                    case.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
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

/// Two pruning steps of the tiny GQA source (every module masked, the Lagrangian on from the
/// first step): the losses and every gradient of step 1, the losses of step 2 (after the three
/// optimizer groups stepped), and the `log_alpha`s and multipliers after it.
struct PruneSteps;

struct PruneOutput {
    losses: [(f64, f64); 2],
    grads: WeightMap,
    after: Vec<(String, Vec<f32>)>,
}

impl AutodiffTask for PruneSteps {
    type Output = PruneOutput;
    fn run<B: shears_models::ShearsAutodiff>(self, device: B::Device) -> PruneOutput {
        let mut stage = shears_tests::prune::stage::<B>(&device);
        let micro = shears_tests::prune::micro_batches();
        let mut losses = [(0.0, 0.0); 2];
        let mut grads = WeightMap::new();
        for (t, l) in losses.iter_mut().enumerate() {
            let s = stage.backward(&micro, t, &[5 + t as u64, 9]);
            *l = (s.lm, s.lagrangian.expect("the Lagrangian is on"));
            if t == 0 {
                grads = stage.gradients();
            }
            stage.apply(1.0);
        }
        let st = stage.state().valid();
        let host = |t: Tensor<B::InnerBackend, 2>| load::host_of(t, DType::F32).to_f32_vec();
        let mut after: Vec<(String, Vec<f32>)> = st
            .masks
            .log_alphas()
            .into_iter()
            .map(|(m, la)| (format!("log_alpha {}", m.name()), host(la)))
            .collect();
        for (m, [l1, l2]) in st.lagrangian.values() {
            after.push((format!("lambda {}", m.name()), vec![l1, l2]));
        }
        PruneOutput {
            losses,
            grads,
            after,
        }
    }
}

#[test]
fn every_backend_prunes_like_ndarray() {
    let reference = dispatch_autodiff(BackendKind::NdArray, PruneSteps).unwrap();
    for group in ["model.", "masks.", "multipliers."] {
        assert!(
            reference.grads.keys().any(|k| k.starts_with(group)),
            "no {group} gradients"
        );
    }
    let mut failures = vec![];
    for kind in BackendKind::compiled() {
        let got = dispatch_autodiff(kind, PruneSteps).unwrap();
        let (_, dloss, dg) = bounds(kind);
        for (t, ((lm, lag), (ref_lm, ref_lag))) in
            got.losses.iter().zip(&reference.losses).enumerate()
        {
            eprintln!("prune step {t} {kind:<8} lm {lm:.6} (ndarray {ref_lm:.6}) lagrangian {lag:.6e} (ndarray {ref_lag:.6e})");
            if lm.is_nan() || (lm - ref_lm).abs() > dloss * ref_lm.abs().max(1.0) {
                failures.push(format!("{kind} step {t}: lm {lm} vs {ref_lm}"));
            }
            if lag.is_nan() || (lag - ref_lag).abs() > dloss * ref_lag.abs().max(1e-3) {
                failures.push(format!("{kind} step {t}: lagrangian {lag} vs {ref_lag}"));
            }
        }
        assert_eq!(
            got.grads.keys().collect::<Vec<_>>(),
            reference.grads.keys().collect::<Vec<_>>(),
            "{kind}: the same gradients"
        );
        let mut worst = 0f64;
        for (name, g) in &reference.grads {
            let r = rel_l2(&got.grads[name].to_f32_vec(), &g.to_f32_vec());
            worst = worst.max(r);
            if r.is_nan() || r > dg {
                failures.push(format!("{kind}: gradient of {name} differs by {r:.2e}"));
            }
        }
        for ((name, x), (_, y)) in got.after.iter().zip(&reference.after) {
            let r = rel_l2(x, y);
            worst = worst.max(r);
            if r.is_nan() || r > dg {
                failures.push(format!("{kind}: {name} after two steps differs by {r:.2e}"));
            }
        }
        eprintln!("prune {kind:<8} worst relative difference (gradients, log_alphas, multipliers) {worst:.2e}");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The device check's `scripts/cubecl.toml` parses as cubecl's configuration (a malformed one
/// panics every cuda process there) and turns the kernel cache on.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn the_device_checks_cubecl_config_parses() {
    use burn_cubecl::cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cubecl.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config: CubeClRuntimeConfig = toml::from_str(&text).unwrap();
    assert!(
        matches!(config.compilation.cache, Some(CacheConfig::Local)),
        "{}: {:?}",
        path.display(),
        config.compilation.cache
    );
}
