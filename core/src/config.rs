//! The model configuration, read straight from an HF `config.json` (`LlamaForCausalLM`,
//! `MistralForCausalLM`), in both the older form (top-level `rope_theta` / `rope_scaling`) and the
//! transformers-5 form (`rope_parameters`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
pub use crate::family::{Activation, Family};

/// Upper bounds on a config's sizes. Far above any published LLaMA-family model (the largest have
/// ~256k vocabularies, 16k–26k widths, 126 layers, 128 heads, 10M-token contexts), they exist so
/// that a corrupt or hostile config is refused before anything is sized from it, and so that every
/// parameter or activation count built from these numbers fits in 64 bits.
pub mod limits {
    /// `vocab_size`.
    pub const VOCAB: usize = 1 << 24;
    /// `hidden_size`, `intermediate_size`.
    pub const WIDTH: usize = 1 << 20;
    /// `num_hidden_layers`.
    pub const LAYERS: usize = 1 << 12;
    /// `num_attention_heads`, `num_key_value_heads`.
    pub const HEADS: usize = 1 << 12;
    /// `head_dim`.
    pub const HEAD_DIM: usize = 1 << 14;
    /// `max_position_embeddings`.
    pub const POSITIONS: usize = 1 << 28;
}

/// An HF LLaMA-family `config.json`. Field names and meanings are HF's; keys Shears does not use
/// are kept in `extra` and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Model classes (`["LlamaForCausalLM"]`).
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    /// `llama` or `mistral`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// Width of the residual stream, d.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP, I.
    pub intermediate_size: usize,
    /// Number of decoder layers, L.
    pub num_hidden_layers: usize,
    /// Number of query heads, H.
    pub num_attention_heads: usize,
    /// Number of key/value heads, G (GQA); defaults to H (MHA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; defaults to hidden_size / num_attention_heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base (older form; see `rope_parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (older form): `{"rope_type": "llama3", "factor": 8.0, ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// RoPE parameters (transformers 5): `{"rope_theta": .., "rope_type": "default" | "llama3", ..}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// Longest context the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Activation of the MLP gate; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Biases on q/k/v/o (unsupported when true).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections (unsupported when true).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral's sliding-window attention span: each query attends to itself and the
    /// `sliding_window - 1` keys before it, in every layer (see
    /// [`LlamaConfig::attention_window`]). LLaMA models ignore the key, as transformers does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    /// End-of-sequence token id(s): an integer or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    /// Padding token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<Value>,
    /// Every other key, preserved.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Read from a multimodal checkpoint's `text_config` (a `Gemma3ForConditionalGeneration`):
    /// its text weights are stored under `language_model`. Not written back: Shears writes
    /// the text decoder alone.
    #[serde(skip)]
    pub from_multimodal: bool,
}

fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama-3.1 / 3.2 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// Apply the scaling to one inverse frequency, in f32 with transformers' order of operations.
    pub fn scale_inv_freq(&self, inv_freq: f32) -> f32 {
        match *self {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor as f32,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high, orig) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position_embeddings as f32,
                );
                let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
                if wavelen < orig / high {
                    inv_freq
                } else if wavelen > orig / low {
                    inv_freq / factor
                } else {
                    let smooth = (orig / wavelen - low) / (high - low);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

/// Resolved RoPE settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Per-layer widths. Finalised pruned models may differ from layer to layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Query heads in this layer.
    pub num_attention_heads: usize,
    /// Key/value heads in this layer.
    pub num_key_value_heads: usize,
    /// MLP width in this layer.
    pub intermediate_size: usize,
}

impl LlamaConfig {
    /// Read and validate `path` (a `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::fsutil::read_text(path, crate::fsutil::SETTINGS_FILE_BYTES)?;
        Self::from_json_str(&text).map_err(|m| Error::format(path, m))
    }

    /// Parse and validate JSON text; the error is a message without the path.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let mut raw: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| format!("invalid model config: {e}"))?;
        let multimodal = crate::family::resolve_config(&mut raw)?;
        let mut cfg: LlamaConfig = serde_json::from_value(Value::Object(raw))
            .map_err(|e| format!("invalid model config: {e}"))?;
        cfg.from_multimodal = multimodal;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The model family: the first of `architectures` Shears knows, else `model_type`.
    pub fn family(&self) -> Family {
        self.architectures
            .iter()
            .find_map(|a| Family::of_architecture(a))
            .or_else(|| Family::of_model_type(&self.model_type))
            .unwrap_or(Family::Llama)
    }

    /// Whether this is a Mistral model.
    pub fn is_mistral(&self) -> bool {
        self.family() == Family::Mistral
    }

    /// A boolean or list key of `config.json` Shears reads but does not model (kept in
    /// `extra`, written back unchanged).
    fn extra_bool(&self, key: &str) -> Option<bool> {
        self.extra.get(key).and_then(|v| v.as_bool())
    }

    /// Whether layer `layer` is a sliding-window ("local") layer, as transformers decides it:
    /// Mistral's are all (given a `sliding_window`); Qwen2's and Qwen3's only with
    /// `use_sliding_window`, those `layer_types` marks `sliding_attention` (or, in configs
    /// without `layer_types`, from `max_window_layers` on); Gemma 3's those `layer_types` marks
    /// (or, without it, all but every `sliding_window_pattern`-th, default 6); LLaMA's none.
    pub fn is_sliding_layer(&self, layer: usize) -> bool {
        let marked = || {
            self.extra
                .get("layer_types")
                .and_then(|v| v.as_array())
                .map(|types| types.get(layer).and_then(|t| t.as_str()) == Some("sliding_attention"))
        };
        match self.family() {
            Family::Llama => false,
            Family::Mistral => self.sliding_window.is_some(),
            Family::Qwen2 | Family::Qwen3 => {
                self.extra_bool("use_sliding_window") == Some(true)
                    && marked().unwrap_or_else(|| {
                        let from = self.extra_u64("max_window_layers").unwrap_or(0);
                        layer as u64 >= from
                    })
            }
            Family::Gemma3 => marked().unwrap_or_else(|| {
                let pattern = self.extra_u64("sliding_window_pattern").unwrap_or(6).max(1);
                !(layer as u64 + 1).is_multiple_of(pattern)
            }),
        }
    }

    /// The sliding window of layer `layer`'s attention, if it has one (see
    /// [`LlamaConfig::is_sliding_layer`]): each query sees itself and the `window - 1` keys
    /// before it.
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_sliding_layer(layer))
    }

    /// This config with only the source layers `kept` (in order): `num_hidden_layers` and, where
    /// layers differ in kind (Gemma 3, Qwen with a window, any config with `layer_types`), an
    /// explicit `layer_types` naming each kept layer's kind, so dropping layers never changes
    /// which attention a kept layer runs.
    pub fn with_layers(&self, kept: &[usize]) -> LlamaConfig {
        let mut c = self.clone();
        c.num_hidden_layers = kept.len();
        let explicit = self.extra.contains_key("layer_types")
            || self.family() == Family::Gemma3
            || (matches!(self.family(), Family::Qwen2 | Family::Qwen3)
                && self.extra_bool("use_sliding_window") == Some(true));
        if explicit {
            let types: Vec<Value> = kept
                .iter()
                .map(|&l| {
                    Value::from(if self.is_sliding_layer(l) {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    })
                })
                .collect();
            c.extra.insert("layer_types".into(), Value::Array(types));
        }
        c
    }

    fn extra_u64(&self, key: &str) -> Option<u64> {
        self.extra.get(key).and_then(|v| v.as_u64())
    }

    fn extra_f64(&self, key: &str) -> Option<f64> {
        self.extra.get(key).and_then(|v| v.as_f64())
    }

    /// The gated MLP's activation.
    pub fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "silu" | "swish" if self.family() != Family::Gemma3 => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" if self.family() == Family::Gemma3 => {
                Ok(Activation::GeluTanh)
            }
            other => Err(format!(
                "hidden_act '{other}' is not supported for {:?} models ({})",
                self.family(),
                if self.family() == Family::Gemma3 {
                    "gelu_pytorch_tanh"
                } else {
                    "silu"
                }
            )),
        }
    }

    /// The attention scores' scale: `query_pre_attn_scalar^-1/2` for Gemma 3, else
    /// `head_dim^-1/2`.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self.query_pre_attn_scalar().sqrt()
    }

    /// What the attention scores are scaled by the inverse square root of: Gemma 3's
    /// `query_pre_attn_scalar`, else `head_dim`.
    pub fn query_pre_attn_scalar(&self) -> f64 {
        match self.family() {
            Family::Gemma3 => self
                .extra_f64("query_pre_attn_scalar")
                .unwrap_or(self.head_dim() as f64),
            _ => self.head_dim() as f64,
        }
    }

    /// What the embedding output is multiplied by: Gemma's `sqrt(hidden_size)` (rounded to
    /// the parameter dtype, as transformers does), else nothing.
    pub fn embed_scale(&self) -> Option<f64> {
        (self.family() == Family::Gemma3).then(|| (self.hidden_size as f64).sqrt())
    }

    /// `layer_types`, when given, names one known attention kind per layer.
    fn check_layer_types(&self) -> std::result::Result<(), String> {
        let Some(v) = self.extra.get("layer_types") else {
            return Ok(());
        };
        let types = v
            .as_array()
            .ok_or("layer_types must be a list of attention kinds")?;
        if types.len() != self.num_hidden_layers {
            return Err(format!(
                "layer_types names {} layers but num_hidden_layers is {}",
                types.len(),
                self.num_hidden_layers
            ));
        }
        for (i, t) in types.iter().enumerate() {
            if !matches!(t.as_str(), Some("full_attention" | "sliding_attention")) {
                return Err(format!(
                    "layer_types[{i}] = {t} is not \"full_attention\" or \"sliding_attention\""
                ));
            }
        }
        Ok(())
    }

    /// Keys of a family's config that would change the model in ways Shears does not run.
    fn check_family_keys(&self) -> std::result::Result<(), String> {
        if self.family() != Family::Gemma3 {
            return Ok(());
        }
        for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if self.extra.get(key).is_some_and(|v| !v.is_null()) {
                return Err(format!(
                    "{key} = {} is not supported (Gemma 3 has none; Gemma 2's softcapping is not run)",
                    self.extra[key]
                ));
            }
        }
        if self.extra_bool("use_bidirectional_attention") == Some(true) {
            return Err("use_bidirectional_attention = true (an encoder) is not supported".into());
        }
        match self.extra_f64("query_pre_attn_scalar") {
            Some(q) if q.is_finite() && q > 0.0 => {}
            None => {}
            Some(q) => return Err(format!("query_pre_attn_scalar {q} must be positive")),
        }
        if self.sliding_window.is_none()
            && (0..self.num_hidden_layers).any(|l| self.is_sliding_layer(l))
        {
            return Err(
                "layer_types has sliding_attention layers but sliding_window is null".into(),
            );
        }
        self.rope_of_kind(true).map(|_| ())
    }

    /// Check that Shears can run this configuration.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self
            .architectures
            .iter()
            .any(|a| Family::of_architecture(a).is_some())
        {
            return Err(format!(
                "architectures {:?} is not supported; Shears runs {}",
                self.architectures,
                Family::supported()
            ));
        }
        self.check_layer_types()?;
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, limits::VOCAB),
            ("hidden_size", self.hidden_size, limits::WIDTH),
            ("intermediate_size", self.intermediate_size, limits::WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, limits::LAYERS),
            (
                "num_attention_heads",
                self.num_attention_heads,
                limits::HEADS,
            ),
            ("num_key_value_heads", self.num_kv_heads(), limits::HEADS),
            ("head_dim", self.head_dim(), limits::HEAD_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                limits::POSITIONS,
            ),
        ] {
            if v > max {
                return Err(format!(
                    "{name} = {v} is beyond what Shears supports ({max}); the config is corrupt or not a LLaMA-family model"
                ));
            }
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window = 0 leaves a query nothing to attend to; give a positive window or null".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        self.activation()?;
        if self.attention_bias || self.mlp_bias {
            return Err(format!(
                "attention_bias / mlp_bias = true is not supported for {:?} models{}",
                self.family(),
                if self.family() == Family::Qwen2 {
                    ""
                } else {
                    " (Qwen2's q/k/v biases are, as Qwen2ForCausalLM)"
                }
            ));
        }
        self.check_family_keys()?;
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        self.rope()?;
        Ok(())
    }

    /// Key/value heads (defaults to the query heads).
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head width (defaults to hidden_size / num_attention_heads).
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The same widths for every layer.
    pub fn uniform_layer_shapes(&self) -> Vec<LayerShape> {
        vec![
            LayerShape {
                num_attention_heads: self.num_attention_heads,
                num_key_value_heads: self.num_kv_heads(),
                intermediate_size: self.intermediate_size,
            };
            self.num_hidden_layers
        ]
    }

    /// First end-of-sequence id, and all of them.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        }
    }

    /// Beginning-of-sequence id.
    pub fn bos_token(&self) -> Option<u32> {
        self.bos_token_id
            .as_ref()
            .and_then(|v| v.as_u64())
            .map(|v| v as u32)
    }

    /// The RoPE of the full-attention layers (every layer, outside Gemma 3), from either
    /// config form.
    pub fn rope(&self) -> std::result::Result<Rope, String> {
        self.rope_of_kind(false)
    }

    /// The RoPE of layer `layer`: Gemma 3's local layers have their own base
    /// (`rope_local_base_freq`, or `rope_parameters.sliding_attention`) and no scaling.
    pub fn rope_of_layer(&self, layer: usize) -> std::result::Result<Rope, String> {
        self.rope_of_kind(self.family() == Family::Gemma3 && self.is_sliding_layer(layer))
    }

    /// Gemma 3's `rope_parameters`, keyed by layer kind (transformers 5), when given so.
    fn rope_parameters_by_kind(&self) -> Option<&Map<String, Value>> {
        let p = self.rope_parameters.as_ref()?.as_object()?;
        (self.family() == Family::Gemma3
            && (p.contains_key("full_attention") || p.contains_key("sliding_attention")))
        .then_some(p)
    }

    fn rope_of_kind(&self, local: bool) -> std::result::Result<Rope, String> {
        let by_kind = self.rope_parameters_by_kind();
        let params = match by_kind {
            Some(p) => {
                let kind = if local {
                    "sliding_attention"
                } else {
                    "full_attention"
                };
                match p.get(kind) {
                    Some(Value::Object(o)) => Some(o),
                    Some(Value::Null) | None => None,
                    Some(_) => return Err(format!("rope_parameters.{kind} is not an object")),
                }
            }
            None if local => None,
            None => self.rope_parameters.as_ref().and_then(|v| v.as_object()),
        };
        let gemma = self.family() == Family::Gemma3;
        let (top_theta, top_scaling, default_theta) = match (gemma, local) {
            (true, true) => (self.extra_f64("rope_local_base_freq"), None, 10_000.0),
            (true, false) => (self.rope_theta, self.rope_scaling.as_ref(), 1_000_000.0),
            (false, _) => (self.rope_theta, self.rope_scaling.as_ref(), 10_000.0),
        };
        self.rope_from(params, top_theta, top_scaling, default_theta)
    }

    fn rope_from(
        &self,
        params: Option<&Map<String, Value>>,
        top_theta: Option<f64>,
        top_scaling: Option<&Value>,
        default_theta: f64,
    ) -> std::result::Result<Rope, String> {
        let inner = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64());
        // transformers 4 reads the top-level value, transformers 5 the one in rope_parameters:
        // two different values would make one file two different models.
        if let (Some(a), Some(b)) = (inner, top_theta) {
            if a != b {
                return Err(format!(
                    "rope_theta {b} and rope_parameters.rope_theta {a} disagree"
                ));
            }
        }
        let theta = inner.or(top_theta).unwrap_or(default_theta);
        // transformers 5 keeps the scaling keys inside rope_parameters; older files use
        // rope_scaling. Given both, they must describe the same scaling (see rope_theta above).
        let parse = |s: &Map<String, Value>| -> std::result::Result<RopeScaling, String> {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            let num = |k: &str| -> std::result::Result<f64, String> {
                s.get(k)
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| format!("rope scaling '{kind}' needs a numeric '{k}'"))
            };
            Ok(match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: num("factor")?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                },
                other => {
                    return Err(format!(
                        "rope type '{other}' is not supported (default, linear and llama3 are)"
                    ))
                }
            })
        };
        let from_params = params.map(parse).transpose()?;
        let from_old = top_scaling
            .and_then(|v| v.as_object())
            .map(parse)
            .transpose()?;
        if let (Some(a), Some(b)) = (&from_params, &from_old) {
            if a != b {
                return Err(format!(
                    "rope_scaling ({b:?}) and rope_parameters ({a:?}) disagree"
                ));
            }
        }
        let scaling = from_params.or(from_old).unwrap_or(RopeScaling::None);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("rope_theta {theta} must be a positive number"));
        }
        let positive = |k: &str, v: f64| -> std::result::Result<(), String> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "rope scaling '{k}' = {v} must be a positive number"
                ))
            }
        };
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("factor", factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                positive(
                    "original_max_position_embeddings",
                    original_max_position_embeddings,
                )?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "rope scaling high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"
                    ));
                }
            }
        }
        Ok(Rope { theta, scaling })
    }

    /// A copy with the RoPE settings written in both forms (top-level `rope_theta` /
    /// `rope_scaling` for transformers 4, `rope_parameters` for transformers 5), so every loader
    /// reads the same thing. Gemma 3's are keyed by layer kind, its local base also written as
    /// `rope_local_base_freq`.
    pub fn with_canonical_rope(&self) -> std::result::Result<Self, String> {
        let rope = self.rope()?;
        let mut c = self.clone();
        c.rope_theta = Some(rope.theta);
        let (params, scaling) = rope_json(&rope);
        c.rope_scaling = scaling;
        if self.family() == Family::Gemma3 {
            let local = self.rope_of_kind(true)?;
            c.extra
                .insert("rope_local_base_freq".into(), local.theta.into());
            let (local_params, _) = rope_json(&local);
            c.rope_parameters = Some(serde_json::json!({
                "full_attention": params,
                "sliding_attention": local_params,
            }));
        } else {
            c.rope_parameters = Some(Value::Object(params));
        }
        Ok(c)
    }

    /// Pretty JSON with canonical RoPE keys.
    pub fn to_json_string(&self) -> Result<String> {
        let c = self.with_canonical_rope().map_err(Error::invalid)?;
        Ok(serde_json::to_string_pretty(&c).expect("config serialises"))
    }
}

/// `rope` as transformers 5's `rope_parameters` object and transformers 4's `rope_scaling`.
fn rope_json(rope: &Rope) -> (Map<String, Value>, Option<Value>) {
    let mut params = Map::new();
    params.insert("rope_theta".into(), rope.theta.into());
    let scaling = match rope.scaling {
        RopeScaling::None => {
            params.insert("rope_type".into(), "default".into());
            None
        }
        RopeScaling::Linear { factor } => {
            Some(serde_json::json!({"rope_type": "linear", "factor": factor}))
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => Some(serde_json::json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings as u64,
        })),
    };
    if let Some(Value::Object(o)) = &scaling {
        for (k, v) in o {
            params.insert(k.clone(), v.clone());
        }
    }
    (params, scaling)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
        "intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,"rms_norm_eps":1e-5"#;

    fn parse(extra: &str) -> std::result::Result<LlamaConfig, String> {
        LlamaConfig::from_json_str(&format!("{BASE}{extra}}}"))
    }

    #[test]
    fn defaults_follow_hf() {
        let c = parse("").unwrap();
        assert_eq!(c.num_kv_heads(), 2);
        assert_eq!(c.head_dim(), 4);
        assert!(!c.tie_word_embeddings);
        assert_eq!(
            c.rope().unwrap(),
            Rope {
                theta: 10000.0,
                scaling: RopeScaling::None
            }
        );
    }

    #[test]
    fn both_rope_forms() {
        let old = parse(
            r#","rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        )
        .unwrap();
        let new = parse(
            r#","rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        )
        .unwrap();
        assert_eq!(old.rope().unwrap(), new.rope().unwrap());
        let canon = old.with_canonical_rope().unwrap();
        assert_eq!(canon.rope().unwrap(), old.rope().unwrap());
        let t5 =
            parse(r#","rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}"#).unwrap();
        assert_eq!(t5.rope().unwrap().theta, 100000.0);
        // Both forms given and different: one file would be two models.
        let both = parse(
            r#","rope_scaling":{"rope_type":"linear","factor":2.0},
            "rope_parameters":{"rope_theta":10000.0,"rope_type":"default"}"#,
        )
        .unwrap_err();
        assert!(both.contains("disagree"), "{both}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = LlamaConfig::from_json_str(r#"{"vocab_size":10}"#).unwrap_err();
        assert!(e.contains("missing field `hidden_size`"), "{e}");
    }

    #[test]
    fn rejects_bad_gqa_and_rope() {
        assert!(parse(r#","num_key_value_heads":3"#)
            .unwrap_err()
            .contains("multiple"));
        assert!(parse(r#","rope_scaling":{"type":"yarn","factor":2.0}"#)
            .unwrap_err()
            .contains("yarn"));
    }

    #[test]
    fn extra_keys_round_trip() {
        let c = parse(r#","initializer_range":0.02"#).unwrap();
        let back = LlamaConfig::from_json_str(&c.to_json_string().unwrap()).unwrap();
        assert_eq!(
            back.extra.get("initializer_range"),
            Some(&serde_json::json!(0.02))
        );
    }
}
