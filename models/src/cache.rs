//! Key/value cache for incremental decoding.

use burn::tensor::{backend::Backend, Tensor};

/// One layer's cached keys and values `[batch, len, kv_heads, head_dim]` (the layout the
/// projections produce and the attention reads).
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
}

impl<B: Backend> LayerCache<B> {
    /// Append new keys and values; returns everything cached so far.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k = match self.k.take() {
            Some(prev) => Tensor::cat(vec![prev, k], 1),
            None => k,
        };
        let v = match self.v.take() {
            Some(prev) => Tensor::cat(vec![prev, v], 1),
            None => v,
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        (k, v)
    }
}

/// Cached keys and values of every layer.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![LayerCache { k: None, v: None }; layers],
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn layers_mut(&mut self) -> impl Iterator<Item = &mut LayerCache<B>> {
        self.layers.iter_mut()
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// The cache of a batch-1 prefix repeated for `n` sequences that continue it (the
    /// choices of a multiple-choice question share their context).
    pub fn repeat_batch(&self, n: usize) -> Self {
        let rep = |t: &Option<Tensor<B, 4>>| t.as_ref().map(|t| t.clone().repeat_dim(0, n));
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerCache {
                    k: rep(&l.k),
                    v: rep(&l.v),
                })
                .collect(),
            len: self.len,
        }
    }
}
