//! Multipliers the forward pass applies at the places the LLM-Shearing spec names (§1.3, §11.1).
//! The pruning crate decides their values (sampled hard-concrete gates, deterministic masks);
//! the model only multiplies them in.

use burn::tensor::{backend::Backend, Tensor};

/// Masks for one forward pass of a model with uniform layers, in the model's compute dtype.
/// Every field is optional; a missing mask is an implicit 1.
#[derive(Debug, Clone)]
pub struct ForwardMasks<B: Backend> {
    /// `z_hidden [d]`: multiplies the embedding output, every RMSNorm output, and the attention
    /// and MLP outputs; the norms average over the channels where it is non-zero.
    pub hidden: Option<Tensor<B, 1>>,
    /// `z_layer [L]`: multiplies layer l's attention output (after `o_proj`) and MLP output.
    pub layer: Option<Tensor<B, 1>>,
    /// `[L, H]`: a factor per query head, multiplying its context before `o_proj`
    /// (`z_kv[l, j / r] · z_q[l, j / r, j % r]` for GQA).
    pub heads: Option<Tensor<B, 2>>,
    /// `z_int [L, I]`: multiplies the MLP up-projection output.
    pub intermediate: Option<Tensor<B, 2>>,
}

impl<B: Backend> Default for ForwardMasks<B> {
    fn default() -> Self {
        ForwardMasks {
            hidden: None,
            layer: None,
            heads: None,
            intermediate: None,
        }
    }
}

/// One layer's share of [`ForwardMasks`].
#[derive(Debug, Clone)]
pub struct LayerMasks<B: Backend> {
    /// `z_hidden [d]` and the number of its non-zero entries (at least 1).
    pub hidden: Option<(Tensor<B, 1>, usize)>,
    /// `z_layer[l]`, one element.
    pub layer: Option<Tensor<B, 1>>,
    /// Per-head factors `[H]`.
    pub heads: Option<Tensor<B, 1>>,
    /// `z_int[l] [I]`.
    pub intermediate: Option<Tensor<B, 1>>,
}

impl<B: Backend> LayerMasks<B> {
    /// No masks: the plain forward.
    pub fn none() -> Self {
        LayerMasks {
            hidden: None,
            layer: None,
            heads: None,
            intermediate: None,
        }
    }
}

fn row<B: Backend>(t: &Tensor<B, 2>, l: usize) -> Tensor<B, 1> {
    let n = t.dims()[1];
    t.clone().narrow(0, l, 1).reshape([n])
}

impl<B: Backend> ForwardMasks<B> {
    /// The number of non-zero entries of `hidden` (exact-zero test), read back to the host once
    /// per forward (the norms divide by it; a GPU backend pays one small sync).
    pub fn hidden_kept(&self) -> Option<usize> {
        self.hidden.as_ref().map(|z| {
            let kept = z.to_data().iter::<f64>().filter(|&v| v != 0.0).count();
            // At least 1: when a sample zeroes every channel the stream is exactly zero and the
            // norm's output must be zero, not 0/0 (the reference's mean over an empty index set
            // is NaN there; a short run on a small model hits it).
            kept.max(1)
        })
    }

    /// Layer `l`'s masks; `kept` is [`ForwardMasks::hidden_kept`], computed once per forward.
    pub fn layer(&self, l: usize, kept: Option<usize>) -> LayerMasks<B> {
        LayerMasks {
            hidden: self.hidden.clone().zip(kept),
            layer: self.layer.as_ref().map(|z| z.clone().narrow(0, l, 1)),
            heads: self.heads.as_ref().map(|z| row(z, l)),
            intermediate: self.intermediate.as_ref().map(|z| row(z, l)),
        }
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> ForwardMasks<B> {
    /// The same masks without autodiff tracking (values only).
    pub fn inner(&self) -> ForwardMasks<B::InnerBackend> {
        ForwardMasks {
            hidden: self.hidden.as_ref().map(|z| z.clone().inner()),
            layer: self.layer.as_ref().map(|z| z.clone().inner()),
            heads: self.heads.as_ref().map(|z| z.clone().inner()),
            intermediate: self.intermediate.as_ref().map(|z| z.clone().inner()),
        }
    }
}
