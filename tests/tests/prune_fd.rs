//! Gradients of the pruning objective against central finite differences in f64 (fixed mask
//! noise): d(loss)/d(log_alpha) for every mask module, d(loss)/d(λ) for both multipliers.
//!
//! This file runs alone in its process on purpose: burn keeps a device's default float type
//! per device, and NdArray<f32> and NdArray<f64> share the CPU device, so f32 tests running in
//! parallel would turn this test's tensors into f32.

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rand::{rngs::StdRng, SeedableRng};
use shears_core::model_files::check_weights;
use shears_core::{DType, WeightMap};
use shears_models::load;
use shears_pruning::{L0Masks, Lagrangian, PerModule, PruningModel};
use shears_tests::prune::{batch, log_alphas, source, spec};

type F64 = burn::backend::NdArray<f64>;
type AD = Autodiff<F64>;

fn state<BB: shears_models::ShearsOps>(
    weights: &WeightMap,
    las: &PerModule<Vec<f32>>,
    l1: &[f32],
    l2: &[f32],
) -> PruningModel<BB> {
    let spec = spec();
    let cfg = source();
    let layers = check_weights(&cfg, weights, std::path::Path::new("<test>")).unwrap();
    let device = Default::default();
    PruningModel {
        model: load::build::<BB>(&cfg, &layers, weights, &device, DType::F32).unwrap(),
        masks: L0Masks::from_values(&spec, las, &device),
        lagrangian: Lagrangian::from_values(&spec, l1, l2, &device),
    }
}

fn total_loss<BB: shears_models::ShearsOps>(s: &PruningModel<BB>) -> Tensor<BB, 1> {
    // A fresh RNG with a fixed seed: the same noise u at every evaluation.
    let mut rng = StdRng::seed_from_u64(1234);
    s.forward_train(batch::<BB>(), &mut rng, 5, 10).total()
}

fn scalar<BB: Backend>(t: Tensor<BB, 1>) -> f64 {
    t.into_data().convert::<f64>().into_vec::<f64>().unwrap()[0]
}

#[test]
fn log_alpha_and_multiplier_gradients_match_finite_differences() {
    let weights = load::random_weights(&source(), 3);
    let las = log_alphas(&spec());
    let (l1, l2) = (
        vec![0.3, -0.2, 0.5, 0.1, -0.4],
        vec![0.7, 0.2, 0.9, 0.4, 0.6],
    );
    assert_eq!(spec().modules.len(), 5);
    let ad = state::<AD>(&weights, &las, &l1, &l2);
    let grads = total_loss(&ad).backward();
    let h = 1e-6;
    let mut checked = 0;
    for (m, values) in las.iter() {
        let param = ad.masks.log_alphas()[m].clone();
        let g: Vec<f64> = param
            .grad(&grads)
            .unwrap()
            .into_data()
            .convert::<f64>()
            .into_vec()
            .unwrap();
        // A few entries of every module.
        for idx in (0..values.len()).step_by((values.len() / 3).max(1)) {
            let mut plus = las.clone();
            let mut minus = las.clone();
            plus.get_mut(m).unwrap()[idx] += h as f32;
            minus.get_mut(m).unwrap()[idx] -= h as f32;
            // f32 storage of log_alpha: use the actually stored perturbation.
            let step = (plus[m][idx] as f64) - (minus[m][idx] as f64);
            let fd = (scalar(total_loss(&state::<F64>(&weights, &plus, &l1, &l2)))
                - scalar(total_loss(&state::<F64>(&weights, &minus, &l1, &l2))))
                / step;
            let err = (fd - g[idx]).abs();
            assert!(
                err <= 1e-3 * g[idx].abs().max(1e-3),
                "{} log_alpha[{idx}]: autodiff {} vs finite difference {fd}",
                m.name(),
                g[idx]
            );
            checked += 1;
        }
    }
    assert!(checked >= 10);

    // d(lagrangian)/d(λ1) = mean(e - t), d/d(λ2) = mean((e - t)^2): check against finite
    // differences in λ.
    let g1: Vec<f64> = ad
        .lagrangian
        .lambda_1
        .val()
        .grad(&grads)
        .unwrap()
        .into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap();
    let g2: Vec<f64> = ad
        .lagrangian
        .lambda_2
        .val()
        .grad(&grads)
        .unwrap()
        .into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap();
    for i in 0..l1.len() {
        for (which, g) in [(1, &g1), (2, &g2)] {
            let (mut a, mut b) = (l1.clone(), l2.clone());
            let (mut a2, mut b2) = (l1.clone(), l2.clone());
            let hh = 1e-3f32;
            if which == 1 {
                a[i] += hh;
                a2[i] -= hh;
            } else {
                b[i] += hh;
                b2[i] -= hh;
            }
            let fd = (scalar(total_loss(&state::<F64>(&weights, &las, &a, &b)))
                - scalar(total_loss(&state::<F64>(&weights, &las, &a2, &b2))))
                / (2.0 * hh as f64);
            assert!(
                (fd - g[i]).abs() <= 1e-6 + 1e-4 * g[i].abs(),
                "λ{which}[{i}]: {} vs {fd}",
                g[i]
            );
        }
        assert!(
            g2[i] >= 0.0,
            "the quadratic multiplier's gradient is a square"
        );
    }
}
