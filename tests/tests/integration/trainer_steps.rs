//! The trainer's stages as libraries: gradient accumulation over micro-batches equals one
//! forward over the whole batch, and a stage saved and loaded into a fresh one continues
//! bit-identically (what exact resume rests on).

use shears_core::{ModelFiles, WeightMap};
use shears_models::backend::NdArrayBackend;
use shears_models::load::random_weights;
use shears_pruning::PruningSpec;
use shears_tests::prune;
use shears_trainer::driver::Stage;
use shears_trainer::lm_stage::LmStage;
use shears_trainer::prune_stage::{PruneRates, PruneStage};
use shears_trainer::records::{StageState, TrainState};
use shears_trainer::AdamWSettings;

type B = burn::backend::Autodiff<NdArrayBackend>;

fn files() -> ModelFiles {
    let config = prune::source();
    ModelFiles {
        weights: random_weights(&config, 5),
        layers: config.uniform_layer_shapes(),
        tokenizer: None,
        source: "<random>".into(),
        config,
    }
}

fn seqs(n: usize, len: usize, salt: u32) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..len)
                .map(|j| (i as u32 * 7 + j as u32 * 3 + salt) % 24)
                .collect()
        })
        .collect()
}

fn settings() -> AdamWSettings {
    AdamWSettings {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    }
}

#[test]
fn accumulated_micro_batches_equal_one_batch() {
    let device = Default::default();
    let batch = seqs(4, 9, 1);
    let mut whole = LmStage::<B>::new(&files(), settings(), &device).unwrap();
    let mut micro = LmStage::<B>::new(&files(), settings(), &device).unwrap();
    let a = whole.backward(std::slice::from_ref(&batch), 0, &[0]);
    let split: Vec<Vec<Vec<u32>>> = batch.chunks(1).map(|c| c.to_vec()).collect();
    let b = micro.backward(&split, 0, &[0, 1, 2, 3]);
    assert!((a.lm - b.lm).abs() < 1e-6, "{} vs {}", a.lm, b.lm);
    let (na, nb) = (whole.grad_norm(), micro.grad_norm());
    assert!((na - nb).abs() < 1e-6 * na, "{na} vs {nb}");
    // Scaling the gradients scales the norm.
    micro.scale_grads(0.5);
    assert!((micro.grad_norm() - nb * 0.5).abs() < 1e-9);
}

fn weights_of<S: Stage<B>>(s: &S) -> WeightMap {
    let tmp = tempfile::tempdir().unwrap();
    s.save(tmp.path()).unwrap();
    ModelFiles::load_hf_dir(tmp.path().join("model"))
        .unwrap()
        .weights
}

#[test]
fn a_saved_and_loaded_stage_continues_bit_identically() {
    let device = Default::default();
    let spec: PruningSpec = prune::spec();
    let rates = PruneRates {
        model: settings(),
        mask_lr: 0.5,
        multiplier_lr: 0.5,
        lagrangian_warmup_steps: 3,
    };
    let step = |s: &mut PruneStage<B>, t: usize| {
        let l = s.backward(&[seqs(2, 7, t as u32)], t, &[t as u64 * 11]);
        s.scale_grads(0.9);
        s.apply(1.0);
        l
    };
    let mut a = PruneStage::<B>::new(&files(), &spec, rates, 3, &device).unwrap();
    for t in 0..3 {
        step(&mut a, t);
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = a.save(tmp.path()).unwrap();
    // A stage built from other initial values, then loaded, is the same stage.
    let mut b = PruneStage::<B>::new(&files(), &spec, rates, 99, &device).unwrap();
    b.load(tmp.path(), &state).unwrap();
    for t in 3..6 {
        let (x, y) = (step(&mut a, t), step(&mut b, t));
        assert_eq!(x.lm.to_bits(), y.lm.to_bits(), "step {t}");
        assert_eq!(
            x.lagrangian.unwrap().to_bits(),
            y.lagrangian.unwrap().to_bits()
        );
    }
    let (wa, wb) = (weights_of(&a), weights_of(&b));
    for (k, v) in &wa {
        assert!(v.bit_eq(&wb[k]), "{k}");
    }
    // A corrupt state is refused when it is read; another stage's state, or one for another
    // target, is an error on load, not a panic.
    let corrupt = serde_json::json!({"stage": "prune", "stage_state": {"optimizer_steps": "nope"}});
    assert!(serde_json::from_value::<StageState>(corrupt).is_err());
    let mut c = PruneStage::<B>::new(&files(), &spec, rates, 1, &device).unwrap();
    let other = StageState::Train(TrainState {
        optimizer_steps: Default::default(),
    });
    assert!(c.load(tmp.path(), &other).is_err());
    let StageState::Prune(mut moved) = state.clone() else {
        panic!("{state:?}")
    };
    moved.modules.pop();
    assert!(c.load(tmp.path(), &StageState::Prune(moved)).is_err());
}
