//! Parameter accounting (method §3, §11.1): what the constraint and the plan count.
//!
//! "Prunable" parameters are those of the attention and MLP projections; embeddings, the LM head
//! and norms are excluded, as in the reference. Totals include everything.

use burn::tensor::{backend::Backend, Tensor};
use shears_core::LlamaConfig;

use crate::masks::L0Masks;
use crate::target::{PruneModule, TargetShape};

/// Widths that decide parameter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate: u64,
    pub vocab: u64,
    pub tied: bool,
    /// q/k/v have biases (Qwen2): `(heads + 2 · kv_heads) · head_dim` per layer.
    pub qkv_bias: bool,
    /// Per-layer norms over the hidden dimension: 2, or Gemma's 4.
    pub hidden_norms: u64,
    /// Per-head q and k norms (`[head_dim]` each) in every layer (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Gemma's GELU-tanh MLP (a composition, no fused kernel).
    pub gelu: bool,
}

impl Dims {
    /// The source's widths.
    pub fn of(c: &LlamaConfig) -> Self {
        Dims {
            layers: c.num_hidden_layers as u64,
            hidden: c.hidden_size as u64,
            heads: c.num_attention_heads as u64,
            kv_heads: c.num_kv_heads() as u64,
            head_dim: c.head_dim() as u64,
            intermediate: c.intermediate_size as u64,
            vocab: c.vocab_size as u64,
            tied: c.tie_word_embeddings,
            qkv_bias: c.family().has_qkv_bias(),
            hidden_norms: if c.family().has_sandwich_norms() {
                4
            } else {
                2
            },
            qk_norm: c.family().has_qk_norm(),
            gelu: c.activation() == Ok(shears_core::Activation::GeluTanh),
        }
    }

    /// A target's widths (head dim, vocabulary and tying from the source).
    pub fn of_target(t: &TargetShape, source: &LlamaConfig) -> Self {
        Dims {
            layers: t.num_hidden_layers as u64,
            hidden: t.hidden_size as u64,
            heads: t.num_attention_heads as u64,
            kv_heads: t.num_key_value_heads as u64,
            intermediate: t.intermediate_size as u64,
            ..Dims::of(source)
        }
    }

    /// Parameters of one layer's attention: q and o count `d·hd` per query head, k and v per kv
    /// head.
    pub fn attention_per_layer(&self) -> u64 {
        2 * self.hidden * self.head_dim * (self.heads + self.kv_heads)
    }

    /// Parameters of one layer's SwiGLU MLP.
    pub fn mlp_per_layer(&self) -> u64 {
        3 * self.hidden * self.intermediate
    }

    /// `L · (attention + MLP)`: what pruning can remove.
    pub fn prunable(&self) -> u64 {
        self.layers * (self.attention_per_layer() + self.mlp_per_layer())
    }

    /// Everything: prunable, embedding, LM head (when untied), the 2L+1 norms, and the q/k/v
    /// biases of the families that have them.
    pub fn total(&self) -> u64 {
        let embed = self.vocab * self.hidden;
        let head = if self.tied { 0 } else { embed };
        let biases = if self.qkv_bias {
            self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim
        } else {
            0
        };
        let qk_norms = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let norms = self.layers * (self.hidden_norms * self.hidden + qk_norms) + self.hidden;
        self.prunable() + embed + head + norms + biases
    }
}

/// Expected number of remaining prunable parameters under the masks' scores (method §3.2 and
/// §11.1), a one-element f32 tensor:
/// `D · Σ_l s_lay[l] · (2·hd·Σ_g s_kv[l,g]·Σ_s s_q[l,g,s] + 2·hd·Σ_g s_kv[l,g] + 3·Σ_k s_int[l,k])`
/// with `D = Σ s_hid` (or d when the hidden mask is off); a missing mask counts as all ones.
pub fn expected_params<B: Backend>(masks: &L0Masks<B>) -> Tensor<B, 1> {
    let spec = &masks.spec;
    let d = Dims::of(&spec.source);
    let (l, g, r) = (
        d.layers as usize,
        d.kv_heads as usize,
        spec.heads_per_group(),
    );
    let scores = masks.scores();
    let get = |m: PruneModule| scores.get(m).cloned();
    let device = scores
        .values()
        .next()
        .map(|t| t.device())
        .unwrap_or_default();
    let ones = |n: usize| Tensor::<B, 1>::ones([n], &device);
    // Σ_s s_q per (layer, group), or r.
    let q_sum = match get(PruneModule::QueryHeads) {
        Some(q) => q.sum_dim(1).reshape([l, g]),
        None => Tensor::<B, 2>::ones([l, g], &device).mul_scalar(r as f64),
    };
    let kv = get(PruneModule::KvHeads).unwrap_or_else(|| Tensor::ones([l, g], &device));
    let hd = d.head_dim as f64;
    let attn =
        (kv.clone() * q_sum).sum_dim(1).mul_scalar(2.0 * hd) + kv.sum_dim(1).mul_scalar(2.0 * hd);
    let mlp = match get(PruneModule::Intermediate) {
        Some(i) => i.sum_dim(1).mul_scalar(3.0),
        None => Tensor::<B, 2>::ones([l, 1], &device).mul_scalar(3.0 * d.intermediate as f64),
    };
    let per_layer = (attn + mlp).reshape([l]);
    let layer = get(PruneModule::Layer)
        .map(|s| s.reshape([l]))
        .unwrap_or_else(|| ones(l));
    let width = match get(PruneModule::Hidden) {
        Some(h) => h.sum(),
        None => ones(1).mul_scalar(d.hidden as f64),
    };
    (per_layer * layer).sum() * width
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(l: usize, d: usize, h: usize, g: usize, i: usize, tied: bool) -> LlamaConfig {
        LlamaConfig::from_json_str(&format!(
            r#"{{"vocab_size":32000,"hidden_size":{d},"intermediate_size":{i},"num_hidden_layers":{l},
            "num_attention_heads":{h},"num_key_value_heads":{g},"rms_norm_eps":1e-5,"tie_word_embeddings":{tied}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn spec_table_3_3() {
        let src = cfg(32, 4096, 32, 32, 11008, false);
        let d = Dims::of(&src);
        assert_eq!(d.prunable(), 6_476_005_376);
        assert_eq!(d.total(), 6_738_415_616);
        for (t, prunable, total, sparsity) in [
            (
                (32, 2560, 20, 6912),
                2_537_553_920u64,
                2_701_560_320u64,
                0.60816,
            ),
            ((24, 2048, 16, 5504), 1_214_251_008, 1_345_423_360, 0.8125),
            ((24, 1024, 8, 2816), 308_281_344, 373_867_520, 0.95240),
        ] {
            let target = TargetShape {
                num_hidden_layers: t.0,
                hidden_size: t.1,
                num_attention_heads: t.2,
                num_key_value_heads: t.2,
                intermediate_size: t.3,
            };
            let td = Dims::of_target(&target, &src);
            assert_eq!(td.prunable(), prunable);
            assert_eq!(td.total(), total);
            let s = 1.0 - td.prunable() as f64 / d.prunable() as f64;
            assert!((s - sparsity).abs() < 5e-6, "{s} vs {sparsity}");
        }
    }

    #[test]
    fn gqa_by_hand() {
        // SmolLM2-135M: 30 x (2*576*64*(9+3) + 3*576*1536) = 30 x (884736 + 2654208).
        let d = Dims::of(&cfg(30, 576, 9, 3, 1536, true));
        assert_eq!(d.attention_per_layer(), 884_736);
        assert_eq!(d.prunable(), 106_168_320);
        // Embedding 49152 x 576 when the vocabulary is SmolLM2's.
        let mut c = cfg(30, 576, 9, 3, 1536, true);
        c.vocab_size = 49152;
        assert_eq!(Dims::of(&c).total(), 134_515_008);
    }
}
