//! Next-token cross-entropy, as HF's causal-LM loss computes it: logits at positions `0..T-1`
//! predict ids `1..T`, in f32 (or f64 on f64 backends).

use burn::tensor::{activation, backend::Backend, Int, Tensor};

use crate::llama::upcast;

/// Per-position negative log-likelihood `[batch, len-1]` of `ids` under `logits`.
pub fn token_nll<B: Backend>(logits: Tensor<B, 3>, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [b, t, v] = logits.dims();
    assert!(t >= 2, "a causal LM loss needs at least two tokens");
    let logits = upcast(logits.narrow(1, 0, t - 1).reshape([b * (t - 1), v]));
    let targets = ids.narrow(1, 1, t - 1).reshape([b * (t - 1), 1]);
    let logp = activation::log_softmax(logits, 1);
    logp.gather(1, targets).neg().reshape([b, t - 1])
}

/// Mean next-token cross-entropy over the batch (a one-element tensor).
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    token_nll(logits, ids).mean()
}

/// The value of a one-element tensor as f64 (a loss read back to the host).
pub fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("a one-element tensor")[0]
}
