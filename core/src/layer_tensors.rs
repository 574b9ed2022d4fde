//! The tensors of a LLaMA-family model in one table: HF name, GGUF name, shape from the config
//! and which structure each dimension counts (so which mask prunes it); which of them a family
//! has is [`LayerTensor::of`]. Loading, export, random
//! initialisation, finalize and the GGUF importer all read this table; nothing else spells a
//! per-layer tensor name.

use crate::config::{Family, LayerShape, LlamaConfig};

/// HF name of the token embedding `[vocab, hidden]`.
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// HF name of the final RMSNorm `[hidden]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// HF name of the untied LM head `[vocab, hidden]`.
pub const LM_HEAD: &str = "lm_head.weight";

/// What one dimension of a per-layer tensor counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Residual-stream channels (`hidden_size`): pruned by the hidden mask.
    Hidden,
    /// Query-head rows (`heads × head_dim`): pruned a head (`head_dim` rows) at a time by the
    /// kv-group and query-head masks.
    QueryHeads,
    /// Key/value rows (`kv_heads × head_dim`): pruned a group at a time by the kv-group mask.
    KvHeads,
    /// MLP channels (`intermediate_size`): pruned by the intermediate mask.
    Intermediate,
    /// The channels of one head (`head_dim`), shared by every head: never pruned.
    HeadDim,
}

impl Axis {
    /// The length of this dimension in a layer of `shape` (`hidden`, `head_dim` from the config).
    pub fn len(self, hidden: usize, head_dim: usize, shape: &LayerShape) -> usize {
        match self {
            Axis::Hidden => hidden,
            Axis::QueryHeads => shape.num_attention_heads * head_dim,
            Axis::KvHeads => shape.num_key_value_heads * head_dim,
            Axis::Intermediate => shape.intermediate_size,
            Axis::HeadDim => head_dim,
        }
    }
}

/// A per-layer tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerTensor {
    InputLayernorm,
    QProj,
    KProj,
    VProj,
    OProj,
    PostAttentionLayernorm,
    GateProj,
    UpProj,
    DownProj,
    /// Qwen2's q/k/v biases.
    QBias,
    KBias,
    VBias,
    /// Qwen3's and Gemma 3's per-head RMSNorm gains on q and k (`[head_dim]`).
    QNorm,
    KNorm,
    /// Gemma 3's norm on the MLP input (LLaMA's `post_attention_layernorm` is Gemma's norm
    /// on the attention output) and on the MLP output.
    PreFeedforwardLayernorm,
    PostFeedforwardLayernorm,
}

impl LayerTensor {
    /// Every per-layer tensor of a LLaMA model, in HF order.
    pub const ALL: [LayerTensor; 9] = [
        LayerTensor::InputLayernorm,
        LayerTensor::QProj,
        LayerTensor::KProj,
        LayerTensor::VProj,
        LayerTensor::OProj,
        LayerTensor::PostAttentionLayernorm,
        LayerTensor::GateProj,
        LayerTensor::UpProj,
        LayerTensor::DownProj,
    ];

    /// The q/k/v biases of the families that have them (Qwen2).
    pub const QKV_BIASES: [LayerTensor; 3] =
        [LayerTensor::QBias, LayerTensor::KBias, LayerTensor::VBias];

    /// The per-head q/k norms (Qwen3, Gemma 3).
    pub const QK_NORMS: [LayerTensor; 2] = [LayerTensor::QNorm, LayerTensor::KNorm];

    /// Gemma 3's norms around the MLP.
    pub const FFN_NORMS: [LayerTensor; 2] = [
        LayerTensor::PreFeedforwardLayernorm,
        LayerTensor::PostFeedforwardLayernorm,
    ];

    /// Every per-layer tensor a model of `config` has: LLaMA's, plus its family's.
    pub fn of(config: &LlamaConfig) -> Vec<LayerTensor> {
        let family = config.family();
        let mut v = Self::ALL.to_vec();
        if family.has_qkv_bias() {
            v.extend(Self::QKV_BIASES);
        }
        if family.has_qk_norm() {
            v.extend(Self::QK_NORMS);
        }
        if family.has_sandwich_norms() {
            v.extend(Self::FFN_NORMS);
        }
        v
    }

    /// Every variant (for name lookups).
    const EVERY: [LayerTensor; 16] = [
        LayerTensor::InputLayernorm,
        LayerTensor::QProj,
        LayerTensor::KProj,
        LayerTensor::VProj,
        LayerTensor::OProj,
        LayerTensor::PostAttentionLayernorm,
        LayerTensor::GateProj,
        LayerTensor::UpProj,
        LayerTensor::DownProj,
        LayerTensor::QBias,
        LayerTensor::KBias,
        LayerTensor::VBias,
        LayerTensor::QNorm,
        LayerTensor::KNorm,
        LayerTensor::PreFeedforwardLayernorm,
        LayerTensor::PostFeedforwardLayernorm,
    ];

    /// HF name inside a layer (`model.layers.N.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            LayerTensor::InputLayernorm => "input_layernorm.weight",
            LayerTensor::QProj => "self_attn.q_proj.weight",
            LayerTensor::KProj => "self_attn.k_proj.weight",
            LayerTensor::VProj => "self_attn.v_proj.weight",
            LayerTensor::OProj => "self_attn.o_proj.weight",
            LayerTensor::PostAttentionLayernorm => "post_attention_layernorm.weight",
            LayerTensor::GateProj => "mlp.gate_proj.weight",
            LayerTensor::UpProj => "mlp.up_proj.weight",
            LayerTensor::DownProj => "mlp.down_proj.weight",
            LayerTensor::QBias => "self_attn.q_proj.bias",
            LayerTensor::KBias => "self_attn.k_proj.bias",
            LayerTensor::VBias => "self_attn.v_proj.bias",
            LayerTensor::QNorm => "self_attn.q_norm.weight",
            LayerTensor::KNorm => "self_attn.k_norm.weight",
            LayerTensor::PreFeedforwardLayernorm => "pre_feedforward_layernorm.weight",
            LayerTensor::PostFeedforwardLayernorm => "post_feedforward_layernorm.weight",
        }
    }

    /// llama.cpp's name inside a block (`blk.N.<name>`) in a model of `family`: Gemma's
    /// `post_attention_layernorm` is llama.cpp's `post_attention_norm`, its
    /// `pre_feedforward_layernorm` the `ffn_norm` LLaMA's `post_attention_layernorm` is.
    pub fn gguf_name(self, family: Family) -> &'static str {
        match self {
            LayerTensor::PostAttentionLayernorm if family.has_sandwich_norms() => {
                "post_attention_norm.weight"
            }
            LayerTensor::InputLayernorm => "attn_norm.weight",
            LayerTensor::QProj => "attn_q.weight",
            LayerTensor::KProj => "attn_k.weight",
            LayerTensor::VProj => "attn_v.weight",
            LayerTensor::OProj => "attn_output.weight",
            LayerTensor::PostAttentionLayernorm => "ffn_norm.weight",
            LayerTensor::GateProj => "ffn_gate.weight",
            LayerTensor::UpProj => "ffn_up.weight",
            LayerTensor::DownProj => "ffn_down.weight",
            LayerTensor::QBias => "attn_q.bias",
            LayerTensor::KBias => "attn_k.bias",
            LayerTensor::VBias => "attn_v.bias",
            LayerTensor::QNorm => "attn_q_norm.weight",
            LayerTensor::KNorm => "attn_k_norm.weight",
            LayerTensor::PreFeedforwardLayernorm => "ffn_norm.weight",
            LayerTensor::PostFeedforwardLayernorm => "post_ffw_norm.weight",
        }
    }

    /// What each dimension counts, in HF layout (`[out, in]` for projections).
    pub fn axes(self) -> &'static [Axis] {
        use Axis::*;
        match self {
            LayerTensor::InputLayernorm
            | LayerTensor::PostAttentionLayernorm
            | LayerTensor::PreFeedforwardLayernorm
            | LayerTensor::PostFeedforwardLayernorm => &[Hidden],
            LayerTensor::QNorm | LayerTensor::KNorm => &[HeadDim],
            LayerTensor::QProj => &[QueryHeads, Hidden],
            LayerTensor::KProj | LayerTensor::VProj => &[KvHeads, Hidden],
            LayerTensor::OProj => &[Hidden, QueryHeads],
            LayerTensor::GateProj | LayerTensor::UpProj => &[Intermediate, Hidden],
            LayerTensor::DownProj => &[Hidden, Intermediate],
            LayerTensor::QBias => &[QueryHeads],
            LayerTensor::KBias | LayerTensor::VBias => &[KvHeads],
        }
    }

    /// A 1-D tensor (a norm gain or a bias) rather than a projection matrix.
    pub fn is_vector(self) -> bool {
        self.axes().len() == 1
    }

    /// An RMSNorm gain.
    pub fn is_norm(self) -> bool {
        self.is_vector() && !self.is_bias()
    }

    /// A projection's bias.
    pub fn is_bias(self) -> bool {
        Self::QKV_BIASES.contains(&self)
    }

    /// The bias of a projection, for the families whose projections have one.
    pub fn bias(self) -> Option<LayerTensor> {
        Self::QKV_BIASES
            .into_iter()
            .find(|b| b.bias_of() == Some(self))
    }

    /// The projection a bias belongs to.
    pub fn bias_of(self) -> Option<LayerTensor> {
        match self {
            LayerTensor::QBias => Some(LayerTensor::QProj),
            LayerTensor::KBias => Some(LayerTensor::KProj),
            LayerTensor::VBias => Some(LayerTensor::VProj),
            _ => None,
        }
    }

    /// The shape in a layer of `shape` of a model with `config`'s hidden size and head size.
    pub fn shape(self, config: &LlamaConfig, shape: &LayerShape) -> Vec<usize> {
        let (d, hd) = (config.hidden_size, config.head_dim());
        self.axes().iter().map(|a| a.len(d, hd, shape)).collect()
    }

    /// The full HF name in layer `layer`.
    pub fn key(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.name())
    }

    /// The tensor and layer an HF name refers to.
    pub fn parse(key: &str) -> Option<(usize, LayerTensor)> {
        let (layer, rest) = key.strip_prefix("model.layers.")?.split_once('.')?;
        let layer = layer.parse().ok()?;
        let t = LayerTensor::EVERY.into_iter().find(|t| t.name() == rest)?;
        Some((layer, t))
    }

    /// The tensor a GGUF block suffix (`attn_q.weight`) names in a model of `family`.
    pub fn from_gguf(suffix: &str, family: Family) -> Option<LayerTensor> {
        LayerTensor::EVERY
            .into_iter()
            .find(|t| t.gguf_name(family) == suffix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse_back() {
        for (i, a) in LayerTensor::EVERY.iter().enumerate() {
            for b in &LayerTensor::EVERY[i + 1..] {
                assert_ne!(a.name(), b.name());
                for f in [Family::Llama, Family::Gemma3] {
                    // Only the tensors one family has need distinct GGUF names in it.
                    if !(f == Family::Llama
                        && [a, b].contains(&&LayerTensor::PreFeedforwardLayernorm))
                    {
                        assert_ne!(a.gguf_name(f), b.gguf_name(f), "{a:?} {b:?} {f:?}");
                    }
                }
            }
            assert_eq!(LayerTensor::parse(&a.key(17)), Some((17, *a)));
            let f = if *a == LayerTensor::PreFeedforwardLayernorm {
                Family::Gemma3
            } else {
                Family::Llama
            };
            assert_eq!(LayerTensor::from_gguf(a.gguf_name(f), f), Some(*a));
        }
        assert_eq!(
            LayerTensor::parse("model.layers.x.mlp.up_proj.weight"),
            None
        );
        assert_eq!(LayerTensor::parse("model.layers.3.mlp.up_proj.bias"), None);
        assert_eq!(
            LayerTensor::parse("model.layers.3.self_attn.k_proj.bias"),
            Some((3, LayerTensor::KBias))
        );
    }

    #[test]
    fn shapes_follow_the_layer() {
        let shape = LayerShape {
            num_attention_heads: 6,
            num_key_value_heads: 2,
            intermediate_size: 40,
        };
        let c: LlamaConfig = serde_json::from_str(
            r#"{"vocab_size":32,"hidden_size":48,"intermediate_size":40,"num_hidden_layers":1,
                "num_attention_heads":6,"num_key_value_heads":2,"rms_norm_eps":1e-5,
                "max_position_embeddings":64}"#,
        )
        .unwrap();
        let got: Vec<Vec<usize>> = LayerTensor::ALL
            .iter()
            .map(|t| t.shape(&c, &shape))
            .collect();
        assert_eq!(
            got,
            vec![
                vec![48],
                vec![48, 48],
                vec![16, 48],
                vec![16, 48],
                vec![48, 48],
                vec![48],
                vec![40, 48],
                vec![40, 48],
                vec![48, 40],
            ]
        );
    }
}
