//! Activation checkpointing by layer: a training forward and backward that keeps only each
//! decoder layer's input alive instead of every intermediate of every layer.
//!
//! A first forward without autodiff records the input of every layer (`L` tensors of
//! `[batch, len, d]`). The backward then runs segment by segment from the top: the final norm
//! and loss from the last hidden state, then each layer from its recorded input (recomputed
//! with autodiff, differentiated with the incoming gradient, dropped), then the embedding. Only
//! one segment's graph is alive at a time; the price is one extra forward. Each segment's
//! gradients are handed to the caller as they come (weights, and the mask parameters the
//! segment's masks were computed from); their sum is the gradient of the whole graph.
//!
//! Masks are rebuilt for every segment by `masks()`, which must give the same values each call
//! (a sampler re-seeded identically): a mask parameter used by many layers then receives the
//! sum of their contributions, as in the unsegmented graph.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::AutodiffModule;
use burn::tensor::{backend::AutodiffBackend, Int, Tensor};

use crate::llama::Llama;
use crate::loss::scalar;
use crate::masks::{ForwardMasks, LayerMasks};
use crate::ops::ShearsAutodiff;

static SEGMENTS: AtomicU64 = AtomicU64::new(0);

/// Segments differentiated so far by this process (tests check that checkpointing ran).
pub fn segments_run() -> u64 {
    SEGMENTS.load(Ordering::Relaxed)
}

/// Forward and backward of `scale ×` the mean next-token NLL of `ids` (masked when `masks`
/// gives masks), keeping only layer inputs between the forward and the backward. Calls
/// `on_grads` once per segment with that segment's gradients. Returns the mean NLL (unscaled).
pub fn backward_by_layers<B: ShearsAutodiff>(
    model: &Llama<B>,
    ids: Tensor<B, 2, Int>,
    masks: &dyn Fn() -> Option<ForwardMasks<B>>,
    scale: f64,
    on_grads: &mut dyn FnMut(<B as AutodiffBackend>::Gradients),
) -> f64 {
    backward_by_layers_with_head(model, ids, masks, scale, on_grads, &mut |y, ids| {
        let loss = model.token_nll(y, ids).mean();
        let value = scalar(loss.clone());
        (loss, value)
    })
}

/// [`backward_by_layers`] with another objective on the final-norm hidden states: `head(y,
/// ids)` returns the loss to differentiate (times `scale`) and the value to return
/// (distillation puts its KD term here).
pub fn backward_by_layers_with_head<B: ShearsAutodiff>(
    model: &Llama<B>,
    ids: Tensor<B, 2, Int>,
    masks: &dyn Fn() -> Option<ForwardMasks<B>>,
    scale: f64,
    on_grads: &mut dyn FnMut(<B as AutodiffBackend>::Gradients),
    head: &mut dyn FnMut(Tensor<B, 3>, Tensor<B, 2, Int>) -> (Tensor<B, 1>, f64),
) -> f64 {
    let [_, t] = ids.dims();
    let mut on_grads = |g| {
        SEGMENTS.fetch_add(1, Ordering::Relaxed);
        on_grads(g)
    };
    let inner = model.valid();
    let m0 = masks();
    let kept = m0.as_ref().and_then(|m| m.hidden_kept());
    let inner_masks = m0.as_ref().map(|m| m.inner());
    drop(m0);
    let layer_masks = |m: Option<&ForwardMasks<B>>, l: usize| match m {
        Some(m) => m.layer(l, kept),
        None => LayerMasks::none(),
    };

    // Forward without a graph: the input of every layer.
    let mut inputs = Vec::with_capacity(inner.model.layers.len());
    {
        let pos = inner.position_inputs(0, t);
        let mut x = inner.embed(ids.clone().inner(), inner_masks.as_ref());
        for (l, layer) in inner.model.layers.iter().enumerate() {
            inputs.push(x.clone());
            let lm = match inner_masks.as_ref() {
                Some(m) => m.layer(l, kept),
                None => LayerMasks::none(),
            };
            x = layer.forward_masked(x, &pos, None, &lm);
        }
        inputs.push(x);
    }

    // The head: final norm and loss from the last hidden state.
    let h = Tensor::<B, 3>::from_inner(inputs.pop().expect("last hidden state")).require_grad();
    let m = masks();
    let y = model.final_norm(h.clone(), m.as_ref(), kept);
    let (loss, value) = head(y, ids.clone());
    let grads = loss.mul_scalar(scale).backward();
    let mut g = h.grad(&grads).expect("the head's input gradient");
    on_grads(grads);

    // The layers, top down, each from its recorded input.
    let pos = model.position_inputs(0, t);
    for (l, layer) in model.model.layers.iter().enumerate().rev() {
        let x = Tensor::<B, 3>::from_inner(inputs.pop().expect("layer input")).require_grad();
        let m = masks();
        let y = layer.forward_masked(x.clone(), &pos, None, &layer_masks(m.as_ref(), l));
        let grads = (y * Tensor::from_inner(g)).sum().backward();
        g = x.grad(&grads).expect("a layer input's gradient");
        on_grads(grads);
    }

    // The embedding.
    let m = masks();
    let e = model.embed(ids, m.as_ref());
    on_grads((e * Tensor::from_inner(g)).sum().backward());
    value
}
