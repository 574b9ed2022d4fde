//! Rotary position embeddings in HF's `rotate_half` convention, with the `linear` and `llama3`
//! frequency scalings. The tables are computed on the host in f32 exactly as transformers
//! computes them, so positions match bit for bit where it matters.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use shears_core::Rope;

/// Inverse frequencies `1 / theta^(2i/d)` after scaling, in f32 as transformers computes them.
pub fn inv_freq(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let theta = rope.theta as f32;
    (0..head_dim / 2)
        .map(|i| {
            rope.scaling
                .scale_inv_freq(1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32))
        })
        .collect()
}

/// `cos` and signed `sin` tables of shape `[len, head_dim]` for positions `start..start+len`.
/// The sign of `rotate_half` is folded into the first half of `sin` (`-sin`, then `+sin`), so
/// [`apply`] is `x·cos + swap_halves(x)·sin` with no negation.
pub fn tables<B: Backend>(
    rope: &Rope,
    head_dim: usize,
    start: usize,
    len: usize,
    dtype: DType,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let inv = inv_freq(rope, head_dim);
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for p in start..start + len {
        // emb = cat(freqs, freqs): the two halves of a head share frequencies.
        for (i, f) in inv.iter().chain(inv.iter()).enumerate() {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(if i < inv.len() { -a.sin() } else { a.sin() });
        }
    }
    let mk = |v: Vec<f32>| {
        Tensor::<B, 2>::from_data(TensorData::new(v, [len, head_dim]), device).cast(dtype)
    };
    (mk(cos), mk(sin))
}

/// Apply RoPE to `x` of shape `[batch, len, heads, head_dim]` (the contiguous layout the
/// projections produce) with the tables of [`tables`]: HF's `x·cos + rotate_half(x)·sin`,
/// through the backend's fused kernel where it has one.
pub fn apply<B: crate::ShearsOps>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Tensor<B, 4> {
    crate::ops::rope(x, cos, sin)
}

/// The generic definition of [`apply`], in burn ops ([`crate::ops::rope_generic`]).
pub use crate::ops::rope_generic as apply_generic;

#[cfg(test)]
mod tests {
    use super::*;
    use shears_core::RopeScaling;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = Rope {
            theta: 500000.0,
            scaling: RopeScaling::None,
        };
        let scaled = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let (a, b) = (inv_freq(&plain, 128), inv_freq(&scaled, 128));
        assert_eq!(a[0], b[0]);
        assert!((a[63] / 8.0 - b[63]).abs() <= 1e-12);
        assert!(b.iter().zip(&a).all(|(s, p)| s <= p));
    }
}
