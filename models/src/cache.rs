//! Key/value cache for incremental decoding.

use burn::tensor::{backend::Backend, Tensor};

/// Per-layer cached keys and values `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    slots: Vec<(Option<Tensor<B, 4>>, Option<Tensor<B, 4>>)>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            slots: vec![(None, None); layers],
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

    pub(crate) fn slots_mut(&mut self) -> impl Iterator<Item = &mut (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>)> {
        self.slots.iter_mut()
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
