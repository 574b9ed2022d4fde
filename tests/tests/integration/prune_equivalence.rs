//! Masked forward with deterministic (exact-target) masks equals the finalized dense model's
//! forward, over random source shapes (MHA and GQA, tied and untied), random `log_alpha`s
//! (with ties at the clamp) and random targets that remove layers, whole kv groups, query
//! heads, hidden channels and MLP channels, for every family (LLaMA; Qwen2, whose pruned heads
//! take their q/k/v bias rows with them; Mistral with a sliding window). Runs on flex, through
//! the fused kernels.

use burn::tensor::{Int, Tensor, TensorData};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shears_core::model_files::check_weights;
use shears_core::{DType, LlamaConfig, WeightMap};
use shears_models::{load, Llama};
use shears_pruning::{
    finalize, FinalizeOptions, L0Masks, PerModule, PruneModule, PruningSpec, TargetShape,
};

/// flex runs the native kernels (fused attention, GEMM, LM head): masked == finalized must hold
/// through them. (ndarray's generic path is held to flex's by `backends.rs`.)
#[cfg(feature = "flex")]
type B = shears_models::backend::FlexBackend;
#[cfg(not(feature = "flex"))]
type B = shears_models::backend::NdArrayBackend;

#[derive(Debug, Clone)]
struct Case {
    layers: usize,
    kv: usize,
    r: usize,
    head_dim: usize,
    hidden: usize,
    inter: usize,
    tied: bool,
    /// An index into [`FAMILIES`].
    family: usize,
    target: TargetShape,
    seed: u64,
}

/// The `config.json` keys of each family of [`Case::family`]: LLaMA; Qwen2 (q/k/v biases);
/// Mistral with a window of 3; Qwen3 (q/k norms) with a window from layer 1 on; Gemma 3 (four
/// `1 + w` norms a layer, the scaled embedding, GELU-tanh, q/k norms, its own score scale, every
/// second layer global with its own rope), whose kept layers must keep their kinds.
const FAMILIES: [&str; 5] = [
    r#""architectures":["LlamaForCausalLM"],"model_type":"llama""#,
    r#""architectures":["Qwen2ForCausalLM"],"model_type":"qwen2""#,
    r#""architectures":["MistralForCausalLM"],"model_type":"mistral","sliding_window":3"#,
    r#""architectures":["Qwen3ForCausalLM"],"model_type":"qwen3","use_sliding_window":true,
       "sliding_window":3,"max_window_layers":1"#,
    r#""architectures":["Gemma3ForCausalLM"],"model_type":"gemma3_text","sliding_window":3,
       "sliding_window_pattern":2,"query_pre_attn_scalar":7,"rope_local_base_freq":100.0,
       "rope_theta":1000.0"#,
];

fn arb_case() -> impl Strategy<Value = Case> {
    (
        1usize..=4,
        1usize..=3,
        1usize..=3,
        prop_oneof![Just(2usize), Just(4), Just(8)],
        3usize..=20,
        2usize..=16,
        any::<bool>(),
        (any::<u64>(), 0usize..FAMILIES.len()),
    )
        .prop_flat_map(
            |(layers, kv, r, head_dim, hidden, inter, tied, (seed, family))| {
                (1..=layers, 1..=kv, 1..=r, 1..=hidden, 1..=inter).prop_map(
                    move |(lt, gt, rt, dt, it)| Case {
                        layers,
                        kv,
                        r,
                        head_dim,
                        hidden,
                        inter,
                        tied,
                        family,
                        target: TargetShape {
                            num_hidden_layers: lt,
                            hidden_size: dt,
                            num_attention_heads: gt * rt,
                            num_key_value_heads: gt,
                            intermediate_size: it,
                        },
                        seed,
                    },
                )
            },
        )
}

fn config(c: &Case) -> LlamaConfig {
    LlamaConfig::from_json_str(&format!(
        r#"{{{},"vocab_size":40,"hidden_size":{},"intermediate_size":{},"num_hidden_layers":{},
        "num_attention_heads":{},"num_key_value_heads":{},"head_dim":{},"rms_norm_eps":1e-5,
        "tie_word_embeddings":{}}}"#,
        FAMILIES[c.family],
        c.hidden,
        c.inter,
        c.layers,
        c.kv * c.r,
        c.kv,
        c.head_dim,
        c.tied
    ))
    .unwrap()
}

/// Random `log_alpha`s, a fifth of them beyond the clamp (ties after clamping).
fn random_log_alphas(spec: &PruningSpec, rng: &mut StdRng) -> PerModule<Vec<f32>> {
    spec.modules
        .iter()
        .map(|&m| {
            let (rows, n) = spec.mask_shape(m);
            let v = (0..rows * n)
                .map(|_| {
                    if rng.random::<f32>() < 0.2 {
                        6.0
                    } else {
                        rng.random_range(-6.0..6.0)
                    }
                })
                .collect();
            (m, v)
        })
        .collect()
}

fn ids(vocab: usize, seed: u64) -> Tensor<B, 2, Int> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<i64> = (0..2 * 7)
        .map(|_| rng.random_range(0..vocab as i64))
        .collect();
    Tensor::from_data(TensorData::new(v, [2, 7]), &Default::default())
}

fn values(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().into_vec().unwrap()
}

fn build(config: &LlamaConfig, weights: &WeightMap) -> Llama<B> {
    let layers = check_weights(config, weights, std::path::Path::new("<test>")).unwrap();
    load::build::<B>(config, &layers, weights, &Default::default(), DType::F32).unwrap()
}

/// Masked and finalized logits of one case; the finalized config is checked against the target.
fn compare(c: &Case, opts: FinalizeOptions) -> (Vec<f32>, Vec<f32>) {
    let source = config(c);
    let modules: Vec<PruneModule> = PruneModule::ALL
        .into_iter()
        .filter(|m| *m != PruneModule::QueryHeads || c.r > 1)
        .collect();
    let spec = PruningSpec::new(&source, c.target, Some(&modules)).unwrap();
    let mut rng = StdRng::seed_from_u64(c.seed);
    let weights = load::random_weights(&source, c.seed);
    let model = build(&source, &weights);
    let masks = L0Masks::<B>::from_values(
        &spec,
        &random_log_alphas(&spec, &mut rng),
        &Default::default(),
    );
    let host = masks.deterministic(true);
    let forward_masks = host
        .to_device::<B>(&Default::default())
        .forward_masks(model.dtype());
    let input = ids(source.vocab_size, c.seed ^ 1);
    let masked = values(model.forward_masked(input.clone(), &forward_masks));

    let (cfg, dense_weights) = finalize(&weights, &host, opts).unwrap();
    assert_eq!(
        TargetShape::of(&cfg),
        c.target,
        "finalized config is the target"
    );
    assert_eq!(cfg.tie_word_embeddings, source.tie_word_embeddings);
    let dense = values(build(&cfg, &dense_weights).forward(input));
    (masked, dense)
}

fn assert_close(masked: &[f32], dense: &[f32], what: &str) {
    let scale = masked.iter().fold(1f32, |a, x| a.max(x.abs()));
    let d = masked
        .iter()
        .zip(dense)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        d <= 1e-4 * scale,
        "{what}: masked and finalized logits differ by {d} (scale {scale})"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn masked_equals_finalized(c in arb_case()) {
        let (masked, dense) = compare(&c, FinalizeOptions::default());
        assert_close(&masked, &dense, &format!("{c:?}"));
    }
}

fn fixed(
    layers: usize,
    kv: usize,
    r: usize,
    tied: bool,
    target: (usize, usize, usize, usize, usize),
) -> Case {
    Case {
        layers,
        kv,
        r,
        head_dim: 4,
        hidden: 16,
        inter: 12,
        tied,
        family: 0,
        target: TargetShape {
            num_hidden_layers: target.0,
            hidden_size: target.1,
            num_attention_heads: target.2 * target.3,
            num_key_value_heads: target.2,
            intermediate_size: target.4,
        },
        seed: 42,
    }
}

#[test]
fn removed_layers_whole_groups_and_heads_inside_groups() {
    // 4 layers of 3 groups x 3 heads -> 2 layers of 2 groups x 1 head: two layers lose every
    // head (and their MLP), kept layers lose a group and two heads in each kept group.
    for tied in [false, true] {
        let (m, d) = compare(
            &fixed(4, 3, 3, tied, (2, 9, 2, 1, 5)),
            FinalizeOptions::default(),
        );
        assert_close(&m, &d, "gqa");
    }
    // MHA: the kv mask is the reference's head mask.
    let (m, d) = compare(
        &fixed(3, 4, 1, false, (2, 10, 3, 1, 7)),
        FinalizeOptions::default(),
    );
    assert_close(&m, &d, "mha");
    // Every other family, the same cut.
    for (family, keys) in FAMILIES.iter().enumerate().skip(1) {
        let c = Case {
            family,
            ..fixed(4, 3, 3, false, (2, 9, 2, 1, 5))
        };
        let (m, d) = compare(&c, FinalizeOptions::default());
        assert_close(&m, &d, keys);
    }
    // Nothing pruned at all: finalize is the identity up to the soft mask values.
    let (m, d) = compare(
        &fixed(2, 2, 2, true, (2, 16, 2, 2, 12)),
        FinalizeOptions::default(),
    );
    assert_close(&m, &d, "identity");
}

#[test]
fn reference_lm_head_double_scaling_is_a_setting() {
    for tied in [false, true] {
        let case = fixed(2, 2, 2, tied, (2, 11, 2, 2, 12));
        let (m, d) = compare(
            &case,
            FinalizeOptions {
                compat_reference_lm_head: true,
            },
        );
        let diff = m
            .iter()
            .zip(&d)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff > 1e-4,
            "the reference's double scaling must show (tied {tied}): {diff}"
        );
    }
}
