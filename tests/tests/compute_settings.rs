//! The compute settings of a stage: bf16-mixed precision tracks f32 on the tiny-train fixture
//! with f32 master weights, bf16 optimizer state tracks f32 state, and layer checkpointing gives
//! the same losses and gradients as the whole graph (continued pre-training and pruning, all
//! three parameter groups), with and without a distillation teacher.

use burn::backend::Autodiff;
use half::bf16;
use shears_core::{DType, ModelFiles, WeightMap};
use shears_models::backend::{FlexBackend, NdArrayBackend};
use shears_models::distill::{Divergence, KdSpec};
use shears_models::{load, recompute, ShearsAutodiff};
use shears_pruning::PruningModel;
use shears_tests::prune::{batch_ids, source, spec};
use shears_tests::{fixture, read_i64, rel_l2};
use shears_trainer::compute::{Checkpointing, Compute, Precision, StatePrecision};
use shears_trainer::{AdamWSettings, LmStage, PruneRates, PruneStage, Stage};

type Flex = Autodiff<FlexBackend>;
type NdArray = Autodiff<NdArrayBackend>;

fn tiny_train() -> (ModelFiles, Vec<Vec<u32>>) {
    let files = ModelFiles::load(fixture("tiny-train/model")).unwrap();
    let (shape, ids) = read_i64(&fixture("tiny-train/batch.safetensors"), "input_ids");
    let batch = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect();
    (files, batch)
}

fn settings() -> AdamWSettings {
    AdamWSettings {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

fn lm_stage<B: ShearsAutodiff>(files: &ModelFiles, compute: Compute) -> LmStage<B> {
    LmStage::<B>::new(files, settings(), &Default::default())
        .unwrap()
        .with_compute(compute)
}

fn losses<B: ShearsAutodiff>(files: &ModelFiles, batch: &[Vec<u32>], c: Compute) -> Vec<f64> {
    let mut s = lm_stage::<B>(files, c);
    (0..20).map(|t| s.step(batch, t, 0, 1.0).lm).collect()
}

fn mixed() -> Compute {
    Compute {
        precision: Precision::Bf16Mixed,
        ..Compute::default()
    }
}

/// The documented tolerance: bf16-mixed losses within 2e-2 relative of f32 over 20 steps.
const MIXED_TOLERANCE: f64 = 2e-2;

#[test]
fn bf16_mixed_tracks_f32_for_20_steps_with_f32_masters() {
    bf16_tracks_f32::<Flex>();
}

/// The device check's copy: bf16-mixed on CUDA (tensor-core bf16 matmuls) against CUDA f32.
#[cfg(feature = "cuda")]
#[test]
fn bf16_mixed_tracks_f32_on_cuda() {
    bf16_tracks_f32::<Autodiff<shears_models::backend::CudaBackend>>();
}

fn bf16_tracks_f32<B: ShearsAutodiff>() {
    let (files, batch) = tiny_train();
    let f32_losses = losses::<B>(&files, &batch, Compute::default());
    for (what, c) in [
        ("bf16-mixed", mixed()),
        (
            "bf16-mixed, bf16 optimizer state",
            Compute {
                optimizer_state: StatePrecision::Bf16,
                ..mixed()
            },
        ),
    ] {
        let got = losses::<B>(&files, &batch, c);
        let mut worst = 0f64;
        for (t, (a, b)) in got.iter().zip(&f32_losses).enumerate() {
            let rel = (a - b).abs() / b;
            worst = worst.max(rel);
            assert!(rel <= MIXED_TOLERANCE, "{what}, step {t}: {a} vs f32 {b}");
        }
        eprintln!("{what}: worst relative loss difference to f32 over 20 steps {worst:.2e}");
        // The run computed in bf16 (it is not the f32 run) and still learned.
        assert!(worst > 1e-6, "{what}: identical to f32, bf16 never ran");
        assert!(got[19] < got[0] * 0.9, "{what}: {} -> {}", got[0], got[19]);
    }

    // The parameters are f32 master weights: after 20 steps they hold values bf16 cannot.
    let mut s = lm_stage::<B>(&files, mixed());
    for t in 0..20 {
        s.step(&batch, t, 0, 1.0);
    }
    let m = s.model();
    assert_eq!(m.dtype(), burn::tensor::DType::F32);
    assert_eq!(m.compute_dtype(), burn::tensor::DType::BF16);
    let w = load::to_weights(m, DType::F32);
    let off_grid = w
        .values()
        .flat_map(|t| t.to_f32_vec())
        .filter(|&x| bf16::from_f32(x).to_f32() != x)
        .count();
    assert!(off_grid > 0, "every weight is bf16-representable");
}

fn assert_close(a: &WeightMap, b: &WeightMap, tol: f64, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: the same gradients"
    );
    let mut worst = 0f64;
    for (name, g) in a {
        let r = rel_l2(&g.to_f32_vec(), &b[name].to_f32_vec());
        worst = worst.max(r);
        assert!(r <= tol, "{what}: gradient of {name} differs by {r:.2e}");
    }
    eprintln!("{what}: worst relative gradient difference {worst:.2e}");
}

fn by_layers() -> Compute {
    Compute {
        checkpointing: Checkpointing::Layers,
        ..Compute::default()
    }
}

fn lm_checkpointing<B: ShearsAutodiff>(what: &str) {
    lm_checkpointing_within::<B>(what, 1e-6)
}

/// The device check's copy, on CUDA: its reductions may run in another order between the two
/// graphs, hence 1e-4.
#[cfg(feature = "cuda")]
#[test]
fn layer_checkpointing_on_cuda() {
    lm_checkpointing_within::<Autodiff<shears_models::backend::CudaBackend>>("cuda", 1e-4);
}

fn lm_checkpointing_within<B: ShearsAutodiff>(what: &str, tol: f64) {
    let (files, batch) = tiny_train();
    let mut whole = lm_stage::<B>(&files, Compute::default());
    let mut layers = lm_stage::<B>(&files, by_layers());
    // Two micro-batches (accumulation), three steps.
    assert!(batch.len() >= 2);
    let half = batch.len() / 2;
    let micro = vec![batch[..half].to_vec(), batch[half..].to_vec()];
    let before = recompute::segments_run();
    for t in 0..3 {
        let a = whole.backward(&micro, t, &[0, 1]);
        let b = layers.backward(&micro, t, &[0, 1]);
        let rel = (a.lm - b.lm).abs() / a.lm;
        assert!(rel <= tol, "{what} step {t}: loss {} vs {}", a.lm, b.lm);
        assert_close(
            &whole.gradients(),
            &layers.gradients(),
            tol,
            &format!("{what} step {t}"),
        );
        whole.apply(1.0);
        layers.apply(1.0);
    }
    // Checkpointing ran: per micro-batch, the head, every layer and the embedding.
    let segments = 3 * 2 * (files.config.num_hidden_layers as u64 + 2);
    assert!(recompute::segments_run() - before >= segments, "{what}");
}

#[test]
fn layer_checkpointing_gives_the_same_training_gradients() {
    lm_checkpointing::<NdArray>("ndarray");
    lm_checkpointing::<Flex>("flex");
}

fn prune_checkpointing<B: ShearsAutodiff>(what: &str) {
    let device = Default::default();
    let stage = |c: Compute| shears_tests::prune::stage::<B>(&device).with_compute(c);
    let (mut whole, mut layers) = (stage(Compute::default()), stage(by_layers()));
    let micro = shears_tests::prune::micro_batches();
    let before = recompute::segments_run();
    for t in 0..3 {
        let a = whole.backward(&micro, t, &[5 + t as u64, 9]);
        let b = layers.backward(&micro, t, &[5 + t as u64, 9]);
        assert!((a.lm - b.lm).abs() / a.lm <= 1e-6, "{what} step {t}");
        assert_eq!(a.lagrangian, b.lagrangian, "{what} step {t}");
        let (ga, gb) = (whole.gradients(), layers.gradients());
        for group in ["model.", "masks.", "multipliers."] {
            assert!(
                ga.keys().any(|k| k.starts_with(group)),
                "{what}: no {group} gradients"
            );
        }
        assert_close(&ga, &gb, 1e-6, &format!("{what} pruning step {t}"));
        whole.apply(1.0);
        layers.apply(1.0);
    }
    let segments = 3 * 2 * (source().num_hidden_layers as u64 + 2);
    assert!(recompute::segments_run() - before >= segments, "{what}");
    // And the masks moved the same way.
    let (a, b) = (whole.state().valid(), layers.state().valid());
    for ((m, x), (_, y)) in a.masks.log_alphas().into_iter().zip(b.masks.log_alphas()) {
        let (x, y) = (
            load::host_of(x, DType::F32).to_f32_vec(),
            load::host_of(y, DType::F32).to_f32_vec(),
        );
        assert!(rel_l2(&x, &y) <= 1e-6, "{what}: log_alpha of {}", m.name());
    }
}

#[test]
fn layer_checkpointing_gives_the_same_pruning_gradients() {
    prune_checkpointing::<NdArray>("ndarray");
    prune_checkpointing::<Flex>("flex");
}

#[test]
fn bf16_mixed_pruning_runs_with_f32_masks() {
    let device = Default::default();
    let model = load::random_model::<Flex>(&source(), 3, &device).unwrap();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let state = PruningModel::new(model, &spec(), &mut rng).unwrap();
    let mut f32_stage = PruneStage::from_state(state.clone(), PruneRates::default());
    let mut stage = PruneStage::from_state(state, PruneRates::default()).with_compute(Compute {
        checkpointing: Checkpointing::Layers,
        ..mixed()
    });
    let ids = batch_ids();
    for t in 0..5 {
        let a = f32_stage.step(&ids, t, 3, 1.0);
        let b = stage.step(&ids, t, 3, 1.0);
        assert!(b.lm.is_finite() && b.lagrangian.unwrap().is_finite());
        assert!(
            (a.lm - b.lm).abs() / a.lm <= MIXED_TOLERANCE,
            "step {t}: {} vs {}",
            a.lm,
            b.lm
        );
    }
    let st = stage.state().valid();
    assert_eq!(st.model.dtype(), burn::tensor::DType::F32);
    for (_, la) in st.masks.log_alphas() {
        assert_eq!(la.dtype(), burn::tensor::DType::F32);
    }
    assert_eq!(
        st.lagrangian.lambda_1.val().dtype(),
        burn::tensor::DType::F32
    );
}

/// A teacher for the tiny-train model: its shape with other (seeded random) weights.
fn teacher(files: &ModelFiles) -> ModelFiles {
    let mut t = files.clone();
    t.weights = load::random_weights(&t.config, 7);
    t
}

fn kd_specs() -> [(KdSpec, f64); 2] {
    [
        (
            KdSpec {
                divergence: Divergence::Kl,
                temperature: 1.0,
                top_k: 0,
            },
            1.0,
        ),
        (
            KdSpec {
                divergence: Divergence::ReverseKl,
                temperature: 2.0,
                top_k: 5,
            },
            0.6,
        ),
    ]
}

fn distill_checkpointing<B: ShearsAutodiff>(what: &str) {
    let (files, batch) = tiny_train();
    let t = teacher(&files);
    let half = batch.len() / 2;
    let micro = vec![batch[..half].to_vec(), batch[half..].to_vec()];
    for (spec, alpha) in kd_specs() {
        let stage = |c: Compute| {
            lm_stage::<B>(&files, c)
                .with_teacher(&t, spec, alpha)
                .unwrap()
        };
        let (mut whole, mut layers) = (stage(Compute::default()), stage(by_layers()));
        let mut kds = Vec::new();
        for step in 0..3 {
            let a = whole.backward(&micro, step, &[0, 1]);
            let b = layers.backward(&micro, step, &[0, 1]);
            let (ka, kb) = (a.distill.unwrap().kd, b.distill.unwrap().kd);
            assert!(ka > 0.0 && a.lm > 0.0, "{what}: {ka} {}", a.lm);
            assert!((a.lm - b.lm).abs() <= 1e-6 * a.lm, "{what} step {step}");
            assert!(
                (ka - kb).abs() <= 1e-6 * ka,
                "{what} step {step}: {ka} vs {kb}"
            );
            assert_close(
                &whole.gradients(),
                &layers.gradients(),
                1e-6,
                &format!("{what} {spec:?} step {step}"),
            );
            whole.apply(1.0);
            layers.apply(1.0);
            kds.push(ka);
        }
        // Learning from the teacher brings the student closer to it.
        assert!(kds[2] < kds[0], "{what} {spec:?}: {kds:?}");
    }
}

#[test]
fn distillation_with_layer_checkpointing_matches_the_whole_graph() {
    distill_checkpointing::<NdArray>("ndarray");
    distill_checkpointing::<Flex>("flex");
}

#[test]
fn distillation_with_alpha_zero_is_plain_training_bit_for_bit() {
    let (files, batch) = tiny_train();
    let t = teacher(&files);
    let (spec, _) = kd_specs()[0];
    let mut plain = lm_stage::<Flex>(&files, Compute::default());
    let mut zero = lm_stage::<Flex>(&files, Compute::default())
        .with_teacher(&t, spec, 0.0)
        .unwrap();
    let mut kd = lm_stage::<Flex>(&files, Compute::default())
        .with_teacher(&t, spec, 0.3)
        .unwrap();
    for step in 0..3 {
        let a = plain.step(&batch, step, 0, 1.0);
        let b = zero.step(&batch, step, 0, 1.0);
        let c = kd.step(&batch, step, 0, 1.0);
        assert_eq!(a.lm.to_bits(), b.lm.to_bits(), "step {step}");
        assert!(b.distill.is_none() && c.distill.is_some());
        if step > 0 {
            // A KD term of any weight changes training.
            assert_ne!(a.lm.to_bits(), c.lm.to_bits(), "step {step}");
        }
    }
    let (wa, wb) = (
        load::to_weights(plain.model(), DType::F32),
        load::to_weights(zero.model(), DType::F32),
    );
    assert!(wa == wb, "alpha = 0 changed the weights");
}

#[test]
fn bf16_mixed_distillation_tracks_f32() {
    let (files, batch) = tiny_train();
    let t = teacher(&files);
    let (spec, alpha) = kd_specs()[1];
    let run = |c: Compute| -> Vec<f64> {
        let mut s = lm_stage::<Flex>(&files, c)
            .with_teacher(&t, spec, alpha)
            .unwrap();
        (0..10)
            .map(|step| s.step(&batch, step, 0, 1.0).objective())
            .collect()
    };
    let (a, b) = (run(Compute::default()), run(mixed()));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= MIXED_TOLERANCE * x.abs(), "{a:?} vs {b:?}");
    }
}
