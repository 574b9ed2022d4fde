//! Knowledge distillation from a teacher's next-token distribution (Minitron's recovery of a
//! pruned model): the divergence between the teacher's and the student's softened
//! distributions at every position the LM loss scores, computed in row chunks so the
//! `[batch, t, vocab]` logits of the two models are never alive at once.
//!
//! For student logits `s` and teacher logits `u` of one position, temperature `T`,
//! `q = softmax(s / T)`, `p = softmax(u / T)`:
//!
//! - `kl` (forward, mean-seeking, Hinton's and Minitron's): `T² · Σ p (log p − log q)`, whose
//!   gradient with respect to `s` is `T · (q − p)`;
//! - `reverse_kl` (mode-seeking, MiniLLM's): `T² · Σ q (log q − log p)`, gradient
//!   `T · q_j ((log q_j − log p_j) − KL_rev / T²)`.
//!
//! The `T²` factor keeps the gradient's scale independent of `T` (Hinton et al.). With `top_k`
//! the sums run over the teacher's `k` largest logits only, both distributions renormalised
//! over that set (the student's gradient is zero outside it).
//!
//! The gradient is computed here in closed form, chunk by chunk, without an autodiff graph over
//! the logits; [`Llama::distill_surrogate`] then hands it to autodiff as a surrogate term
//! `Σ h ⊙ ∂L/∂h + Σ W ⊙ ∂L/∂W` whose gradient is exactly the KD gradient with respect to the
//! student's final hidden states `h` and LM-head weight `W`. It runs on every backend.

use burn::tensor::backend::Backend;
use burn::tensor::{activation, IndexingUpdateOp, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::llama::{to_dtype, upcast, Llama};
use crate::loss::scalar;
use crate::ops::{self, ShearsAutodiff, ShearsOps};

/// Which divergence distillation minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// `KL(teacher ‖ student)`: the student covers every mode of the teacher.
    #[default]
    Kl,
    /// `KL(student ‖ teacher)`: the student concentrates on the teacher's main modes.
    ReverseKl,
}

/// How the KD term is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdSpec {
    pub divergence: Divergence,
    /// Softmax temperature of both distributions (> 0).
    pub temperature: f64,
    /// Only the teacher's `top_k` largest logits (renormalised); 0 = the whole vocabulary.
    pub top_k: usize,
}

/// Logits per KD chunk: rows × vocabulary of one chunk's `[rows, vocab]` tensors (about eight
/// of them are alive at once, f32).
pub const KD_CHUNK_ELEMS: usize = 1 << 23;

/// The KD term of rows of logits: per row the `T²`-scaled divergence `[rows]`, and its
/// gradient with respect to the student logits `[rows, vocab]`. f32 (f64 on f64 backends).
pub fn kd_rows<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    spec: &KdSpec,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let [rows, vocab] = student.dims();
    let t = spec.temperature;
    let (s, u, picked) = if spec.top_k > 0 && spec.top_k < vocab {
        let (u, idx) = teacher.topk_with_indices(spec.top_k, 1);
        (student.gather(1, idx.clone()), u, Some(idx))
    } else {
        (student, teacher, None)
    };
    let log_q = activation::log_softmax(s.div_scalar(t), 1);
    let log_p = activation::log_softmax(u.div_scalar(t), 1);
    let (value, grad) = match spec.divergence {
        Divergence::Kl => {
            let p = log_p.clone().exp();
            let q = log_q.clone().exp();
            let value = (p.clone() * (log_p - log_q)).sum_dim(1);
            (value, q - p)
        }
        Divergence::ReverseKl => {
            let q = log_q.clone().exp();
            let d = log_q - log_p;
            let value = (q.clone() * d.clone()).sum_dim(1);
            let grad = q * (d - value.clone());
            (value, grad)
        }
    };
    let value = value.mul_scalar(t * t).reshape([rows]);
    let grad = grad.mul_scalar(t);
    let grad = match picked {
        Some(idx) => Tensor::<B, 2>::zeros([rows, vocab], &grad.device()).scatter(
            1,
            idx,
            grad,
            IndexingUpdateOp::Add,
        ),
        None => grad,
    };
    (value, grad)
}

/// Sums of one KD evaluation over its rows, and the gradients it hands back.
pub struct KdRows<B: Backend> {
    /// Σ over rows of the `T²`-scaled divergence.
    pub kd_sum: f64,
    /// Σ over rows of the student's next-token NLL (the LM loss, for the metrics).
    pub nll_sum: f64,
    /// Rows scored.
    pub rows: usize,
    /// `scale ×` the gradient of `kd_sum` with respect to the student rows `[rows, d]`, f32.
    pub grad_h: Tensor<B, 2>,
    /// `scale ×` its gradient with respect to the student's head weight `[vocab, d]`, f32.
    pub grad_w: Tensor<B, 2>,
}

/// The KD term of student rows `h [n, d]` (head weight `w [vocab, d]`, both in the compute
/// dtype) against teacher rows `ht [n, dt]` (head `wt [vocab, dt]`), in chunks of at most
/// `chunk_elems` logits ([`KD_CHUNK_ELEMS`] in training). `targets [n]` are the next tokens (for
/// the NLL only).
#[allow(clippy::too_many_arguments)]
pub fn kd_chunked<B: ShearsOps>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    ht: Tensor<B, 2>,
    wt: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    spec: &KdSpec,
    scale: f64,
    chunk_elems: usize,
) -> KdRows<B> {
    let [n, d] = h.dims();
    let [vocab, _] = w.dims();
    assert_eq!(
        wt.dims()[0],
        vocab,
        "teacher and student vocabularies differ"
    );
    let chunk = (chunk_elems / vocab.max(1)).max(1);
    let w32 = upcast(w.clone());
    let mut grad_w = Tensor::<B, 2>::zeros([vocab, d], &h.device());
    let mut grads_h = Vec::with_capacity(n.div_ceil(chunk));
    let (mut kd_sum, mut nll_sum) = (0.0, 0.0);
    let mut start = 0;
    while start < n {
        let c = chunk.min(n - start);
        let hc = h.clone().narrow(0, start, c);
        let zs = upcast(ops::matmul(hc.clone(), w.clone().transpose()));
        let zt = upcast(ops::matmul(
            ht.clone().narrow(0, start, c),
            wt.clone().transpose(),
        ));
        let tc = targets.clone().narrow(0, start, c).reshape([c, 1]);
        let nll = activation::log_softmax(zs.clone(), 1)
            .gather(1, tc)
            .neg()
            .sum();
        let (value, grad) = kd_rows(zs, zt, spec);
        kd_sum += scalar(value.sum());
        nll_sum += scalar(nll);
        let grad = grad.mul_scalar(scale);
        grads_h.push(ops::matmul(grad.clone(), w32.clone()));
        grad_w = grad_w + ops::matmul(grad.transpose(), upcast(hc));
        start += c;
    }
    KdRows {
        kd_sum,
        nll_sum,
        rows: n,
        grad_h: Tensor::cat(grads_h, 0),
        grad_w,
    }
}

/// The KD term's values for the metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdValues {
    /// Mean `T²`-scaled divergence over the scored positions.
    pub kd: f64,
    /// Mean next-token NLL of the student over the same positions.
    pub nll: f64,
}

impl<B: ShearsOps> Llama<B> {
    /// The LM head's weight as `[vocab, d]` (a view of `lm_head`, or the tied embedding), in
    /// the parameter dtype.
    pub fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val().transpose(),
            None => self.model.embed_tokens.weight.val(),
        }
    }

    /// The teacher side of distillation: final hidden states of `ids [b, t]` at the positions
    /// that predict a next token, `[b·(t−1), d]`, forward only.
    pub fn distill_rows(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = ids.dims();
        assert!(t >= 2, "distillation needs at least two tokens");
        let h = self.hidden_states(ids, None);
        let d = h.dims()[2];
        h.narrow(1, 0, t - 1).reshape([b * (t - 1), d])
    }
}

impl<B: ShearsAutodiff> Llama<B> {
    /// A surrogate term whose gradient is `scale ×` the gradient of the mean KD term of this
    /// student's final hidden states `h [b, t, d]` against `teacher`'s rows `teacher_rows`
    /// ([`Llama::distill_rows`] of the same ids), with respect to `h` (and through it the whole
    /// model) and the LM head. Its value is meaningless; the KD and NLL means come back beside
    /// it.
    pub fn distill_surrogate(
        &self,
        h: Tensor<B, 3>,
        ids: Tensor<B, 2, Int>,
        teacher: &Llama<B::InnerBackend>,
        teacher_rows: Tensor<B::InnerBackend, 2>,
        spec: &KdSpec,
        scale: f64,
    ) -> (Tensor<B, 1>, KdValues) {
        let [b, t, d] = h.dims();
        assert!(t >= 2, "distillation needs at least two tokens");
        let n = b * (t - 1);
        let rows = h.narrow(1, 0, t - 1).reshape([n, d]);
        let dt = rows.dtype();
        let w = self.head_weight();
        let targets = ids.narrow(1, 1, t - 1).reshape([n]).inner();
        let r = kd_chunked(
            rows.clone().inner(),
            to_dtype(w.clone().inner(), dt),
            teacher_rows,
            to_dtype(teacher.head_weight(), teacher.compute_dtype()),
            targets,
            spec,
            scale / n as f64,
            KD_CHUNK_ELEMS,
        );
        let values = KdValues {
            kd: r.kd_sum / n as f64,
            nll: r.nll_sum / n as f64,
        };
        let w_part = (upcast(w) * Tensor::from_inner(r.grad_w)).sum();
        let h_part = (upcast(rows) * Tensor::from_inner(r.grad_h)).sum();
        (h_part + w_part, values)
    }
}
