//! Every family's gradients against central finite differences in f64, on tiny models of each
//! (windows shorter than the batch's 6 tokens): the pruning objective's d/d(log_alpha) for all
//! five mask modules (fixed mask noise), and the language-model loss's d/d(weight) for entries of
//! every tensor the family has (Qwen2's biases, q/k norms, Gemma's four `1 + w` norms and scaled
//! embedding). (The stages running on each family end to end: `cli/tests/families.rs`.)
//!
//! Alone in its process like `prune_fd.rs`: burn keeps one default float type per CPU device,
//! which f32 tests running beside it would change.

use burn::backend::Autodiff;
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rand::{rngs::StdRng, SeedableRng};
use shears_core::model_files::check_weights;
use shears_core::{DType, LlamaConfig, WeightMap};
use shears_models::load::{self, ParamVisitor};
use shears_models::Llama;
use shears_pruning::{L0Masks, Lagrangian, PerModule, PruningModel, PruningSpec, TargetShape};
use shears_tests::prune::{batch, batch_ids, log_alphas};

type F64 = burn::backend::NdArray<f64>;
type AD = Autodiff<F64>;

/// The tiny GQA shape of `shears_tests::prune::source` in each family.
const FAMILIES: [(&str, &str); 4] = [
    (
        "qwen2",
        r#""architectures":["Qwen2ForCausalLM"],"tie_word_embeddings":false,"head_dim":4"#,
    ),
    (
        "qwen3-window",
        r#""architectures":["Qwen3ForCausalLM"],"use_sliding_window":true,"sliding_window":3,
        "max_window_layers":1,"head_dim":6"#,
    ),
    (
        "mistral-window",
        r#""architectures":["MistralForCausalLM"],"sliding_window":2,"head_dim":4"#,
    ),
    (
        "gemma3",
        r#""architectures":["Gemma3ForCausalLM"],"sliding_window":3,"sliding_window_pattern":2,
        "query_pre_attn_scalar":5,"rope_local_base_freq":100.0,"rope_theta":1000.0,"head_dim":4"#,
    ),
];

fn config(keys: &str) -> LlamaConfig {
    LlamaConfig::from_json_str(&format!(
        r#"{{{keys},"vocab_size":24,"hidden_size":8,"intermediate_size":6,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5}}"#
    ))
    .unwrap()
}

fn spec(cfg: &LlamaConfig) -> PruningSpec {
    let target = TargetShape {
        num_hidden_layers: 1,
        hidden_size: 6,
        num_attention_heads: 1,
        num_key_value_heads: 1,
        intermediate_size: 4,
    };
    PruningSpec::new(cfg, target, None).unwrap()
}

fn build<BB: shears_models::ShearsOps>(cfg: &LlamaConfig, weights: &WeightMap) -> Llama<BB> {
    let layers = check_weights(cfg, weights, std::path::Path::new("<test>")).unwrap();
    load::build::<BB>(cfg, &layers, weights, &Default::default(), DType::F32).unwrap()
}

fn scalar<BB: Backend>(t: Tensor<BB, 1>) -> f64 {
    t.into_data().convert::<f64>().into_vec::<f64>().unwrap()[0]
}

fn prune_state<BB: shears_models::ShearsOps>(
    cfg: &LlamaConfig,
    weights: &WeightMap,
    las: &PerModule<Vec<f32>>,
) -> PruningModel<BB> {
    let spec = spec(cfg);
    let n = spec.modules.len();
    let device = Default::default();
    PruningModel {
        model: build::<BB>(cfg, weights),
        masks: L0Masks::from_values(&spec, las, &device),
        lagrangian: Lagrangian::from_values(&spec, &vec![0.3; n], &vec![0.5; n], &device),
    }
}

fn prune_loss<BB: shears_models::ShearsOps>(state: &PruningModel<BB>) -> Tensor<BB, 1> {
    // A fresh RNG with a fixed seed: the same noise u at every evaluation.
    let mut rng = StdRng::seed_from_u64(1234);
    state.forward_train(batch::<BB>(), &mut rng, 5, 10).total()
}

fn check(what: &str, autodiff: f64, fd: f64) {
    assert!(
        (fd - autodiff).abs() <= 1e-3 * autodiff.abs().max(1e-3),
        "{what}: autodiff {autodiff} vs finite difference {fd}"
    );
}

/// d(pruning objective)/d(log_alpha), a few entries of every module.
fn log_alpha_gradients(name: &str, cfg: &LlamaConfig, weights: &WeightMap) -> usize {
    let las = log_alphas(&spec(cfg));
    let state = prune_state::<AD>(cfg, weights, &las);
    let grads = prune_loss(&state).backward();
    let value =
        |las: &PerModule<Vec<f32>>| scalar(prune_loss(&prune_state::<F64>(cfg, weights, las)));
    let mut checked = 0;
    for (m, values) in las.iter() {
        let g: Vec<f64> = state.masks.log_alphas()[m]
            .grad(&grads)
            .unwrap()
            .into_data()
            .convert::<f64>()
            .into_vec()
            .unwrap();
        for idx in (0..values.len()).step_by((values.len() / 3).max(1)) {
            let (mut plus, mut minus) = (las.clone(), las.clone());
            plus.get_mut(m).unwrap()[idx] += 1e-6;
            minus.get_mut(m).unwrap()[idx] -= 1e-6;
            let step = plus[m][idx] as f64 - minus[m][idx] as f64;
            let fd = (value(&plus) - value(&minus)) / step;
            check(&format!("{name} {} log_alpha[{idx}]", m.name()), g[idx], fd);
            checked += 1;
        }
    }
    checked
}

/// The gradient of every parameter under its HF name, in HF layout.
fn weight_grads(model: &Llama<AD>) -> Vec<(String, Vec<f64>)> {
    let ids = batch::<AD>();
    let grads = model.loss(ids).backward();
    struct Collect<'a>(
        Vec<(String, Vec<f64>)>,
        &'a <AD as burn::tensor::backend::AutodiffBackend>::Gradients,
    );
    impl ParamVisitor<AD> for Collect<'_> {
        fn visit<const D: usize>(&mut self, name: String, p: &Param<Tensor<AD, D>>, t: bool) {
            let g = p
                .val()
                .grad(self.1)
                .expect("every parameter has a gradient");
            let g = if t { g.transpose() } else { g };
            self.0
                .push((name, g.into_data().convert::<f64>().into_vec().unwrap()));
        }
    }
    let mut c = Collect(Vec::new(), &grads);
    load::visit_params(model, &mut c);
    c.0
}

/// d(LM loss)/d(weight), a few entries of every tensor.
fn weight_gradients(name: &str, cfg: &LlamaConfig, weights: &WeightMap) -> usize {
    let grads = weight_grads(&build::<AD>(cfg, weights));
    assert_eq!(grads.len(), weights.len(), "{name}: a gradient per tensor");
    let loss = |w: &WeightMap| scalar(build::<F64>(cfg, w).loss(batch::<F64>()));
    let mut checked = 0;
    for (tensor, g) in &grads {
        for idx in (0..g.len()).step_by((g.len() / 2).max(1)) {
            let (mut plus, mut minus) = (weights.clone(), weights.clone());
            let bump = |w: &mut WeightMap, by: f32| {
                let t = w.get_mut(tensor).unwrap();
                let mut v = t.to_f32_vec();
                v[idx] += by;
                *t = shears_core::HostTensor::f32(t.shape.clone(), v);
            };
            bump(&mut plus, 1e-4);
            bump(&mut minus, -1e-4);
            let step =
                plus[tensor].to_f32_vec()[idx] as f64 - minus[tensor].to_f32_vec()[idx] as f64;
            let fd = (loss(&plus) - loss(&minus)) / step;
            check(&format!("{name} {tensor}[{idx}]"), g[idx], fd);
            checked += 1;
        }
    }
    checked
}

#[test]
fn every_family_has_finite_difference_gradients() {
    for (name, keys) in FAMILIES {
        let cfg = config(keys);
        let windows = (0..2).filter_map(|l| cfg.attention_window(l));
        assert!(windows.clone().all(|w| w < batch_ids()[0].len()), "{name}");
        assert_eq!(
            windows.count() > 0,
            name.contains("window") || name == "gemma3"
        );
        let weights = load::random_weights(&cfg, 3);
        let masks = log_alpha_gradients(name, &cfg, &weights);
        let params = weight_gradients(name, &cfg, &weights);
        eprintln!("{name}: {masks} log_alpha and {params} weight entries match");
        assert!(masks >= 10 && params >= weights.len());
    }
}
