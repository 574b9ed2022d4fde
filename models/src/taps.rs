//! Activation taps: per-structure statistics read at the places the pruning masks act (the
//! per-head attention context, the MLP activation, the norm outputs feeding each sublayer, a
//! block's input and output), accumulated over the tokens of no-grad forwards. The pruning crate
//! turns them into importance scores (method §12); the forward itself is the one the masks use
//! ([`crate::llama::DecoderLayer::forward_tapped`]), not a copy.

use burn::tensor::{backend::Backend, Tensor};

use crate::ops::tensor::upcast;

/// One layer's sums over every tapped token, in f32 on the model's device.
#[derive(Debug, Clone)]
pub struct LayerTaps<B: Backend> {
    /// `Σ_tokens ‖context of head h‖₂` `[H]`: each head's output before `o_proj`.
    pub heads: Tensor<B, 1>,
    /// `Σ_tokens act_c²` `[I]`: the gated MLP activation (`act(gate) · up`) per channel.
    pub intermediate: Tensor<B, 1>,
    /// `Σ_tokens |n_c|` `[d]` over the outputs of the norms feeding the attention and the MLP.
    pub hidden: Tensor<B, 1>,
    /// `Σ_tokens (1 - cos(x_in, x_out))` `[1]`: how much the block changes the residual stream.
    pub block: Tensor<B, 1>,
}

impl<B: Backend> LayerTaps<B> {
    /// Zero sums for a layer of `heads` heads, `intermediate` MLP channels and width `hidden`.
    pub fn zeros(heads: usize, intermediate: usize, hidden: usize, device: &B::Device) -> Self {
        LayerTaps {
            heads: Tensor::zeros([heads], device),
            intermediate: Tensor::zeros([intermediate], device),
            hidden: Tensor::zeros([hidden], device),
            block: Tensor::zeros([1], device),
        }
    }

    /// Add the per-head norms of `ctx [b, t, H, hd]`.
    pub fn add_heads(&mut self, ctx: &Tensor<B, 4>) {
        let [b, t, h, _] = ctx.dims();
        let norms = upcast(ctx.clone()).square().sum_dim(3).sqrt();
        self.heads = self.heads.clone() + norms.reshape([b * t, h]).sum_dim(0).reshape([h]);
    }

    /// Add the squares of the MLP activation `act [b, t, I]`.
    pub fn add_intermediate(&mut self, act: &Tensor<B, 3>) {
        self.intermediate = self.intermediate.clone() + channel_sum(upcast(act.clone()).square());
    }

    /// Add the magnitudes of a norm's output `n [b, t, d]`.
    pub fn add_hidden(&mut self, n: &Tensor<B, 3>) {
        self.hidden = self.hidden.clone() + channel_sum(upcast(n.clone()).abs());
    }

    /// Add `1 - cos` between the block's input and output at every token.
    pub fn add_block(&mut self, input: &Tensor<B, 3>, output: &Tensor<B, 3>) {
        let (x, y) = (upcast(input.clone()), upcast(output.clone()));
        let dot = (x.clone() * y.clone()).sum_dim(2);
        let norms = (x.square().sum_dim(2) * y.square().sum_dim(2)).sqrt();
        let cos = dot / norms.clamp_min(1e-30);
        self.block = self.block.clone() + cos.neg().add_scalar(1.0).sum().reshape([1]);
    }
}

/// `Σ_{b,t} x[b, t, c]` `[c]`.
fn channel_sum<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 1> {
    let [b, t, c] = x.dims();
    x.reshape([b * t, c]).sum_dim(0).reshape([c])
}
