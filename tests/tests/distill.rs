//! Knowledge distillation's loss and gradient in f64: the KD term of rows of logits against a
//! hand computation on a tiny vocabulary (full and top-k, both directions, temperatures), its
//! closed-form gradient against finite differences of that hand computation, chunking, and the
//! whole student's gradient through the surrogate term against finite differences of
//! `(1 − α)·LM + α·KD` in the weights (tied and untied heads, a teacher of another shape).
//!
//! This file runs alone in its process on purpose (see prune_fd.rs): burn keeps a device's
//! default float type per device, and NdArray<f32> and NdArray<f64> share the CPU device.

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use shears_core::model_files::check_weights;
use shears_core::tensor::HostData;
use shears_core::{DType, LlamaConfig, WeightMap};
use shears_models::distill::{kd_chunked, kd_rows, Divergence, KdSpec};
use shears_models::{load, Llama, ShearsOps};
use shears_tests::prune::{batch, source};

type F64 = burn::backend::NdArray<f64>;
type AD = Autodiff<F64>;

/// Weight perturbation of the finite differences (the weights are stored in f32).
const FD_STEP: f32 = 1e-4;

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().into_vec::<f64>().unwrap()
}

fn matrix<B: Backend>(rows: &[Vec<f64>]) -> Tensor<B, 2> {
    let (r, c) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [r, c]), &Default::default())
}

/// The divergence of one row, written from the definition: softmax over the teacher's `k`
/// largest logits (all of them with `k = 0`), `T² · Σ a (log a − log b)`.
fn hand(s: &[f64], u: &[f64], spec: &KdSpec) -> f64 {
    let mut idx: Vec<usize> = (0..u.len()).collect();
    idx.sort_by(|&a, &b| u[b].partial_cmp(&u[a]).unwrap());
    if spec.top_k > 0 {
        idx.truncate(spec.top_k);
    }
    let t = spec.temperature;
    let soft = |z: &[f64]| -> Vec<f64> {
        let e: Vec<f64> = idx.iter().map(|&i| (z[i] / t).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.into_iter().map(|x| x / sum).collect()
    };
    let (q, p) = (soft(s), soft(u));
    let (a, b) = match spec.divergence {
        Divergence::Kl => (&p, &q),
        Divergence::ReverseKl => (&q, &p),
    };
    t * t
        * a.iter()
            .zip(b)
            .map(|(x, y)| x * (x.ln() - y.ln()))
            .sum::<f64>()
}

fn specs() -> Vec<KdSpec> {
    let mut v = Vec::new();
    for divergence in [Divergence::Kl, Divergence::ReverseKl] {
        for temperature in [1.0, 2.5] {
            for top_k in [0, 3] {
                v.push(KdSpec {
                    divergence,
                    temperature,
                    top_k,
                });
            }
        }
    }
    v
}

#[test]
fn kd_rows_match_a_hand_computation_and_finite_differences() {
    let student = vec![
        vec![0.3, -1.2, 2.0, 0.5, -0.1, 1.1, -2.2],
        vec![1.5, 0.2, -0.7, -1.9, 0.8, 0.05, 0.6],
        vec![-0.4, 0.9, 0.1, 2.4, -1.1, -0.3, 1.7],
    ];
    let teacher = vec![
        vec![1.0, -0.5, 2.5, 0.2, -1.0, 0.7, -3.0],
        vec![0.4, 1.1, -0.2, -2.5, 1.6, -0.8, 0.3],
        vec![-1.2, 0.5, 0.9, 1.8, -0.6, 0.1, 2.2],
    ];
    for spec in specs() {
        let (value, grad) = kd_rows(matrix::<F64>(&student), matrix::<F64>(&teacher), &spec);
        let (value, grad) = (to_vec(value), to_vec(grad));
        for r in 0..3 {
            let want = hand(&student[r], &teacher[r], &spec);
            assert!(want > 1e-3, "{spec:?}: a trivial row");
            assert!(
                (value[r] - want).abs() <= 1e-12 * want.max(1.0),
                "{spec:?} row {r}: {} vs {want}",
                value[r]
            );
            for j in 0..7 {
                let h = 1e-6;
                let (mut plus, mut minus) = (student[r].clone(), student[r].clone());
                plus[j] += h;
                minus[j] -= h;
                let fd = (hand(&plus, &teacher[r], &spec) - hand(&minus, &teacher[r], &spec))
                    / (2.0 * h);
                let g = grad[r * 7 + j];
                assert!(
                    (g - fd).abs() <= 1e-7,
                    "{spec:?} row {r} logit {j}: gradient {g} vs finite difference {fd}"
                );
            }
        }
    }
    // Identical distributions: nothing to learn.
    let (value, grad) = kd_rows(
        matrix::<F64>(&teacher),
        matrix::<F64>(&teacher),
        &specs()[0],
    );
    assert!(to_vec(value).iter().all(|v| v.abs() < 1e-12));
    assert!(to_vec(grad).iter().all(|g| g.abs() < 1e-12));
}

fn config(tied: bool, layers: usize, hidden: usize) -> LlamaConfig {
    let mut c = source();
    c.tie_word_embeddings = tied;
    c.num_hidden_layers = layers;
    c.hidden_size = hidden;
    c
}

fn model<BB: ShearsOps>(cfg: &LlamaConfig, w: &WeightMap) -> Llama<BB> {
    let layers = check_weights(cfg, w, std::path::Path::new("<test>")).unwrap();
    load::build::<BB>(cfg, &layers, w, &Default::default(), DType::F32).unwrap()
}

fn targets<BB: Backend>(ids: Tensor<BB, 2, Int>) -> Tensor<BB, 1, Int> {
    let [b, t] = ids.dims();
    ids.narrow(1, 1, t - 1).reshape([b * (t - 1)])
}

/// `(1 − α)·LM + α·KD` of the student `w` against the teacher, without autodiff.
fn objective(
    cfg: &LlamaConfig,
    w: &WeightMap,
    teacher: &Llama<F64>,
    spec: &KdSpec,
    alpha: f64,
    chunk: usize,
) -> f64 {
    let m = model::<F64>(cfg, w);
    let ids = batch::<F64>();
    let rows = m.distill_rows(ids.clone());
    let r = kd_chunked(
        rows,
        m.head_weight(),
        teacher.distill_rows(ids.clone()),
        teacher.head_weight(),
        targets(ids),
        spec,
        1.0,
        chunk,
    );
    let n = r.rows as f64;
    (1.0 - alpha) * r.nll_sum / n + alpha * r.kd_sum / n
}

#[test]
fn chunks_give_the_whole_result() {
    let cfg = config(false, 2, 8);
    let student = model::<F64>(&cfg, &load::random_weights(&cfg, 3));
    let teacher = model::<F64>(&cfg, &load::random_weights(&cfg, 5));
    let ids = batch::<F64>();
    let run = |chunk: usize| {
        kd_chunked(
            student.distill_rows(ids.clone()),
            student.head_weight(),
            teacher.distill_rows(ids.clone()),
            teacher.head_weight(),
            targets(ids.clone()),
            &specs()[3],
            0.5,
            chunk,
        )
    };
    // 10 rows of 24 logits: one chunk, and chunks of 3 rows (the last one short).
    let (whole, parts) = (run(1 << 20), run(3 * 24));
    assert_eq!(whole.rows, 10);
    assert!((whole.kd_sum - parts.kd_sum).abs() < 1e-12);
    assert!((whole.nll_sum - parts.nll_sum).abs() < 1e-12);
    let close = |a: Vec<f64>, b: Vec<f64>| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-12);
    assert!(close(to_vec(whole.grad_h), to_vec(parts.grad_h)));
    assert!(close(to_vec(whole.grad_w), to_vec(parts.grad_w)));
}

fn perturbed(w: &WeightMap, name: &str, i: usize, h: f32) -> (WeightMap, f64) {
    let mut w = w.clone();
    let t = w.get_mut(name).unwrap();
    let HostData::F32(v) = &mut t.data else {
        panic!("f32 weights")
    };
    let before = v[i];
    v[i] += h;
    let step = v[i] as f64 - before as f64;
    (w, step)
}

#[test]
fn student_gradients_through_the_surrogate_match_finite_differences() {
    let ids = batch::<AD>();
    // The teacher has another depth and width than the student (a source and its pruned
    // model), the same vocabulary.
    let tcfg = config(false, 3, 12);
    let teacher = model::<F64>(&tcfg, &load::random_weights(&tcfg, 5));
    let mut checked = 0;
    for (tied, spec, alpha) in [
        (true, specs()[0], 1.0),
        (false, specs()[3], 0.4),
        (false, specs()[6], 1.0),
        (true, specs()[7], 0.7),
    ] {
        let cfg = config(tied, 2, 8);
        let w = load::random_weights(&cfg, 3);
        let student = model::<AD>(&cfg, &w);
        let rows = teacher.distill_rows(batch::<F64>());
        let y = student.hidden_states(ids.clone(), None);
        let (sur, values) =
            student.distill_surrogate(y.clone(), ids.clone(), &teacher, rows, &spec, alpha);
        let total = student
            .token_nll(y, ids.clone())
            .mean()
            .mul_scalar(1.0 - alpha)
            + sur;
        let grads = total.backward();
        // The values reported beside the surrogate are the objective's terms.
        let value = (1.0 - alpha) * values.nll + alpha * values.kd;
        let want = objective(&cfg, &w, &teacher, &spec, alpha, 1 << 20);
        assert!((value - want).abs() < 1e-12, "{value} vs {want}");
        let head = if tied {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        // Gradients in HF layout `[out, in]` (burn's linears hold `[in, out]`).
        let linear_grad =
            |w: Tensor<AD, 2>| to_vec(w.grad(&grads).expect("a gradient").transpose());
        let head_grad = match &student.lm_head {
            Some(l) => linear_grad(l.weight.val()),
            None => to_vec(
                student
                    .model
                    .embed_tokens
                    .weight
                    .val()
                    .grad(&grads)
                    .expect("a gradient"),
            ),
        };
        let params: Vec<(&str, Vec<f64>)> = vec![
            (
                "model.layers.0.self_attn.q_proj.weight",
                linear_grad(student.model.layers[0].self_attn.q_proj.weight.val()),
            ),
            (
                "model.layers.1.mlp.down_proj.weight",
                linear_grad(student.model.layers[1].mlp.down_proj.weight.val()),
            ),
            (
                "model.norm.weight",
                to_vec(
                    student
                        .model
                        .norm
                        .weight
                        .val()
                        .grad(&grads)
                        .expect("a gradient"),
                ),
            ),
            (head, head_grad),
        ];
        for (name, g) in params {
            let n = g.len();
            for i in (0..n).step_by((n / 4).max(1)) {
                let (plus, sp) = perturbed(&w, name, i, FD_STEP);
                let (minus, sm) = perturbed(&w, name, i, -FD_STEP);
                let fd = (objective(&cfg, &plus, &teacher, &spec, alpha, 48)
                    - objective(&cfg, &minus, &teacher, &spec, alpha, 48))
                    / (sp - sm);
                assert!(
                    (g[i] - fd).abs() <= 1e-4 * fd.abs().max(1e-3),
                    "tied {tied} {spec:?} alpha {alpha} {name}[{i}]: {} vs finite difference {fd}",
                    g[i]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 40, "{checked}");
}
