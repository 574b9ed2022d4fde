//! The direction of a multiplier step (ascent), hard-concrete sampling statistics, and the
//! determinism of eval masks. (Finite-difference gradient checks: `prune_fd.rs`.)

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use rand::{rngs::StdRng, Rng, SeedableRng};
use shears_models::backend::NdArrayBackend;
use shears_pruning::hard_concrete;
use shears_pruning::{L0Masks, PerModule, PruneModule};
use shears_tests::prune::{batch_ids, log_alphas, spec};
use shears_trainer::Stage;

#[test]
fn a_multiplier_step_is_ascent() {
    // At initialisation the expected sparsity (~0.002) is below every target: the gap e - t is
    // negative, so ascent moves λ1 down (towards the sign of the gap) and λ2 up, and the
    // penalty λ1(e - t) + λ2(e - t)² becomes positive: the constraint starts to bite.
    type NA = Autodiff<NdArrayBackend>;
    // The production step, as the loop drives it (one micro-batch, no clipping).
    let mut stage = shears_tests::prune::stage::<NA>(&Default::default());
    let ids = batch_ids();
    let before = stage.eval_extras(0).pruning.unwrap();
    for (m, e) in before.expected_sparsity.iter() {
        let t = before.target_sparsity[m];
        assert!(
            *e < t,
            "{}: expected {e} should start below target {t}",
            m.name()
        );
    }
    let first = stage.step(&ids, 0, 7, 1.0);
    assert_eq!(first.lagrangian, Some(0.0), "multipliers start at zero");
    for (m, [l1, l2]) in stage.state().lagrangian.values() {
        assert!(
            l1 < 0.0,
            "{}: λ1 {l1} should move towards the (negative) gap",
            m.name()
        );
        assert!(l2 > 0.0, "{}: λ2 {l2} should grow", m.name());
    }
    let second = stage.step(&ids, 1, 8, 1.0);
    let penalty = second.lagrangian.unwrap();
    assert!(penalty > 0.0, "the penalty is now positive: {penalty}");
    // The masks moved towards the target: expected sparsity increased.
    let after = stage.eval_extras(2).pruning.unwrap();
    for (m, b) in before.expected_sparsity.iter() {
        let a = after.expected_sparsity[m];
        assert!(a >= *b, "{}: {b} -> {a}", m.name());
    }
    let _ = stage.state().model.valid();
}

#[test]
fn hard_concrete_zero_fraction_matches_one_minus_score() {
    type NB = NdArrayBackend;
    let las = [-3.0f32, -1.0, 0.0, 1.0, 3.0];
    let n = 40_000;
    let mut rng = StdRng::seed_from_u64(5);
    let eps = hard_concrete::EPSILON as f32;
    let u: Vec<f32> = (0..n * las.len())
        .map(|_| rng.random_range(eps..1.0 - eps))
        .collect();
    let la: Vec<f32> = (0..n).flat_map(|_| las).collect();
    let device = Default::default();
    let z = hard_concrete::sample(
        Tensor::<NB, 2>::from_data(TensorData::new(la, [n, las.len()]), &device),
        Tensor::<NB, 2>::from_data(TensorData::new(u, [n, las.len()]), &device),
    );
    let z: Vec<f32> = z.into_data().into_vec().unwrap();
    for (j, &a) in las.iter().enumerate() {
        let zeros = (0..n).filter(|i| z[i * las.len() + j] == 0.0).count() as f64 / n as f64;
        let p = 1.0 - hard_concrete::score_host(a) as f64;
        let sigma = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (zeros - p).abs() <= 4.0 * sigma + 1e-4,
            "log_alpha {a}: zeros {zeros} vs P(z=0) {p}"
        );
        // Samples are in [0, 1], with mass at both ends.
        assert!((0..n).all(|i| (0.0..=1.0).contains(&z[i * las.len() + j])));
    }
}

#[test]
fn eval_masks_are_deterministic_and_training_samples_are_seeded() {
    type NB = NdArrayBackend;
    let spec = spec();
    let device = Default::default();
    let masks = L0Masks::<NB>::from_values(&spec, &log_alphas(&spec), &device);
    assert_eq!(masks.deterministic(false), masks.deterministic(false));
    assert_eq!(masks.deterministic(true), masks.deterministic(true));
    let draw = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        masks
            .sample(&mut rng)
            .values
            .into_iter()
            .flat_map(|(_, t)| t.into_data().into_vec::<f32>().unwrap())
            .collect::<Vec<f32>>()
    };
    assert_eq!(draw(3), draw(3));
    assert_ne!(draw(3), draw(4));
    // Exact-target masks keep exactly the target's counts per row.
    let exact = masks.deterministic(true);
    for &m in &spec.modules {
        let (rows, n) = spec.mask_shape(m);
        let v = exact.get(m).unwrap();
        for r in 0..rows {
            let kept = v[r * n..(r + 1) * n].iter().filter(|x| **x != 0.0).count();
            assert_eq!(kept, spec.target_kept(m), "{} row {r}", m.name());
        }
    }
}

#[test]
fn expected_size_matches_the_closed_form_for_gqa() {
    // Every entry of a module shares one log_alpha, so every score is one known number and the
    // §11.1 formula can be written out by hand:
    // E = (d·s_h) · L·s_l · (2·hd·G·s_kv·r·s_q + 2·hd·G·s_kv + 3·I·s_i)
    type NB = NdArrayBackend;
    let spec = spec(); // 2 layers, d 8, 4 heads in 2 groups (r = 2), head_dim 4, I 6
    let per_module = [
        (PruneModule::Hidden, 1.5f32),
        (PruneModule::Layer, -0.5),
        (PruneModule::Intermediate, 0.25),
        (PruneModule::KvHeads, 3.0),
        (PruneModule::QueryHeads, -2.0),
    ];
    let las: PerModule<Vec<f32>> = per_module
        .iter()
        .map(|&(m, a)| {
            let (rows, n) = spec.mask_shape(m);
            (m, vec![a; rows * n])
        })
        .collect();
    let masks = L0Masks::<NB>::from_values(&spec, &las, &Default::default());
    let got: f64 = shears_pruning::size::expected_params(&masks)
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .unwrap()[0];
    let s = |m: PruneModule| {
        hard_concrete::score_host(per_module.iter().find(|p| p.0 == m).unwrap().1) as f64
    };
    let (d, l, hd, g, r, i) = (8.0, 2.0, 4.0, 2.0, 2.0, 6.0);
    let want = d
        * s(PruneModule::Hidden)
        * l
        * s(PruneModule::Layer)
        * (2.0 * hd * g * s(PruneModule::KvHeads) * r * s(PruneModule::QueryHeads)
            + 2.0 * hd * g * s(PruneModule::KvHeads)
            + 3.0 * i * s(PruneModule::Intermediate));
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "expected params {got} vs closed form {want}"
    );
    // At the top of the clamp every score is s = score(ln 100): the same formula with one s.
    let full = las.map_ref(|_, v| vec![10.0; v.len()]);
    let masks = L0Masks::<NB>::from_values(&spec, &full, &Default::default()).clamped();
    let got: f64 = shears_pruning::size::expected_params(&masks)
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .unwrap()[0];
    let s = hard_concrete::score_host(100f32.ln()) as f64;
    let want = d * s * l * s * (2.0 * hd * g * s * r * s + 2.0 * hd * g * s + 3.0 * i * s);
    assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    let prunable = shears_pruning::size::Dims::of(&spec.source).prunable() as f64;
    assert!(got < prunable && got > 0.98 * prunable);
}
