//! Model families: the table of what each supported architecture is called (HF
//! `architectures` / `model_type`, llama.cpp's `general.architecture`), which tensors its layers
//! add to LLaMA's, how its forward differs, and the defaults its configs rely on.

use serde_json::{json, Map, Value};

/// A model family Shears runs: which tensors its layers have (see
/// `layer_tensors::LayerTensor::of`) and how its forward differs from LLaMA's. Adding a family
/// is a variant here, its rows in the tables below and in `LayerTensor`, and its fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    /// LLaMA's layers with a sliding window over every layer.
    Mistral,
    /// Biases on q/k/v; an optional sliding window from `max_window_layers` on.
    Qwen2,
    /// Qwen2 without the biases, with a per-head RMSNorm on q and k (`q_norm`, `k_norm`) and a
    /// `head_dim` of its own.
    Qwen3,
    /// Gemma 3's text decoder: four norms per layer (the attention and MLP outputs are normed
    /// too), RMSNorm gains stored as `w` and applied as `1 + w`, embeddings scaled by
    /// `sqrt(hidden_size)`, a GELU-tanh gated MLP, q/k norms, `query_pre_attn_scalar`, and local
    /// sliding-window layers with their own RoPE base between global ones.
    Gemma3,
}

/// The activation of the gated MLP (`down(act(gate(x)) · up(x))`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU's `x · sigmoid(x)`.
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Family {
    /// The `architectures` entries Shears runs, with their family. A
    /// `Gemma3ForConditionalGeneration` checkpoint is read as its text decoder.
    pub const ARCHITECTURES: [(&'static str, Family); 6] = [
        ("LlamaForCausalLM", Family::Llama),
        ("MistralForCausalLM", Family::Mistral),
        ("Qwen2ForCausalLM", Family::Qwen2),
        ("Qwen3ForCausalLM", Family::Qwen3),
        ("Gemma3ForCausalLM", Family::Gemma3),
        ("Gemma3ForConditionalGeneration", Family::Gemma3),
    ];

    /// Every family, with HF's `architectures` entry, `model_type` and llama.cpp's architecture.
    const NAMES: [(Family, &'static str, &'static str, &'static str); 5] = [
        (Family::Llama, "LlamaForCausalLM", "llama", "llama"),
        // llama.cpp runs Mistral as `llama` (its window in Shears' own keys).
        (Family::Mistral, "MistralForCausalLM", "mistral", "llama"),
        (Family::Qwen2, "Qwen2ForCausalLM", "qwen2", "qwen2"),
        (Family::Qwen3, "Qwen3ForCausalLM", "qwen3", "qwen3"),
        (Family::Gemma3, "Gemma3ForCausalLM", "gemma3_text", "gemma3"),
    ];

    fn names(self) -> (&'static str, &'static str, &'static str) {
        let (_, a, m, g) = Self::NAMES
            .iter()
            .find(|(f, ..)| *f == self)
            .expect("every family has its names");
        (a, m, g)
    }

    /// The family of an `architectures` entry.
    pub fn of_architecture(a: &str) -> Option<Family> {
        Self::ARCHITECTURES
            .iter()
            .find(|(name, _)| *name == a)
            .map(|(_, f)| *f)
    }

    /// The family of a `model_type`.
    pub fn of_model_type(t: &str) -> Option<Family> {
        Self::NAMES.iter().find(|n| n.2 == t).map(|n| n.0)
    }

    /// The family of a GGUF architecture (`mistral`, which older converters wrote, included).
    pub fn of_gguf_arch(a: &str) -> Option<Family> {
        if a == "mistral" {
            return Some(Family::Mistral);
        }
        Self::NAMES.iter().find(|n| n.3 == a).map(|n| n.0)
    }

    /// The supported architectures, for messages.
    pub fn supported() -> String {
        Self::ARCHITECTURES
            .iter()
            .map(|(a, _)| *a)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The GGUF architectures Shears reads, for messages.
    pub fn supported_gguf() -> String {
        let mut v: Vec<&str> = Self::NAMES.iter().map(|n| n.3).collect();
        v.dedup();
        v.join(", ")
    }

    /// Whether q, k and v have biases.
    pub fn has_qkv_bias(self) -> bool {
        self == Family::Qwen2
    }

    /// Whether q and k are RMS-normed per head (`q_norm`, `k_norm`, shape `[head_dim]`) before
    /// RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Family::Qwen3 | Family::Gemma3)
    }

    /// Whether the attention and MLP outputs are normed before the residual add (Gemma's
    /// `post_attention_layernorm` and `post_feedforward_layernorm`), with the MLP's input norm
    /// then named `pre_feedforward_layernorm`.
    pub fn has_sandwich_norms(self) -> bool {
        self == Family::Gemma3
    }

    /// What an RMSNorm adds to its stored gain: Gemma applies `x̂ · (1 + w)`.
    pub fn norm_offset(self) -> f32 {
        if self == Family::Gemma3 {
            1.0
        } else {
            0.0
        }
    }

    /// llama.cpp's architecture (`general.architecture`) for the family: Mistral runs as
    /// `llama`.
    pub fn gguf_arch(self) -> &'static str {
        self.names().2
    }

    /// Whether llama.cpp stores q/k rows permuted for its interleaved RoPE (its `llama`
    /// architecture does; the others run the NEOX layout, which is HF's).
    pub fn gguf_permutes_qk(self) -> bool {
        self.gguf_arch() == "llama"
    }

    /// Whether llama.cpp stores the RMSNorm gains as applied (`1 + w`) where HF stores `w`.
    pub fn gguf_norms_offset(self) -> bool {
        self == Family::Gemma3
    }

    /// HF's `architectures` entry and `model_type` of the family.
    pub fn hf_names(self) -> (&'static str, &'static str) {
        let (a, m, _) = self.names();
        (a, m)
    }
}

/// The family a raw `config.json` object names (architectures first, then `model_type`).
fn family_of(cfg: &Map<String, Value>) -> Option<Family> {
    let from_arch = cfg
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .find_map(Family::of_architecture)
        });
    from_arch.or_else(|| {
        cfg.get("model_type")
            .and_then(|t| t.as_str())
            .and_then(Family::of_model_type)
    })
}

/// The defaults of transformers' config class for `family` that published checkpoints leave
/// out (Gemma 3's nest only what differs from `Gemma3TextConfig`; Qwen's omit the window keys).
fn defaults(family: Family) -> Value {
    match family {
        Family::Gemma3 => json!({
            "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "pad_token_id": 0,
            "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": true,
            "query_pre_attn_scalar": 256, "sliding_window": 4096,
        }),
        // Qwen's `sliding_window` (4096) only counts with `use_sliding_window`: see
        // `resolve_config`.
        Family::Qwen2 => json!({"rms_norm_eps": 1e-6, "max_window_layers": 28}),
        Family::Qwen3 => json!({"rms_norm_eps": 1e-6, "max_window_layers": 28, "head_dim": 128}),
        Family::Llama | Family::Mistral => json!({}),
    }
}

/// A `config.json` object as Shears reads it: a `Gemma3ForConditionalGeneration` config
/// becomes its text decoder's (`text_config`, with the token ids the outer config sets), and
/// the keys its family's transformers class defaults are filled in. Returns whether the config
/// was a multimodal one (its weights then live under `language_model`).
pub fn resolve_config(cfg: &mut Map<String, Value>) -> Result<bool, String> {
    let multimodal = cfg
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|x| x.as_str() == Some("Gemma3ForConditionalGeneration"))
        });
    if multimodal {
        let mut text = match cfg.get("text_config") {
            Some(Value::Object(t)) => t.clone(),
            Some(_) => return Err("text_config is not an object".into()),
            None => Map::new(),
        };
        // The outer config's token ids are the checkpoint's (its `text_config` often keeps the
        // class defaults); tying is the decoder's unless only the outer config says.
        for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = cfg.get(k).filter(|v| !v.is_null()) {
                text.insert(k.into(), v.clone());
            }
        }
        if let (Some(v), false) = (
            cfg.get("tie_word_embeddings"),
            text.contains_key("tie_word_embeddings"),
        ) {
            text.insert("tie_word_embeddings".into(), v.clone());
        }
        let (arch, model_type) = Family::Gemma3.hf_names();
        text.insert("architectures".into(), json!([arch]));
        text.insert("model_type".into(), model_type.into());
        *cfg = text;
    }
    let Some(family) = family_of(cfg) else {
        return Ok(multimodal);
    };
    if let Value::Object(d) = defaults(family) {
        for (k, v) in d {
            cfg.entry(k).or_insert(v);
        }
    }
    // transformers' Qwen configs keep their window (default 4096) only with use_sliding_window.
    let qwen = matches!(family, Family::Qwen2 | Family::Qwen3);
    if qwen && cfg.get("use_sliding_window") == Some(&Value::Bool(true)) {
        cfg.entry("sliding_window").or_insert(json!(4096));
    }
    // transformers' Gemma 3 reads `hidden_activation` (a `hidden_act` beside it is ignored).
    if family == Family::Gemma3 {
        let act = cfg["hidden_activation"].clone();
        cfg.insert("hidden_act".into(), act);
    }
    Ok(multimodal)
}

/// The text decoder's name for a tensor of a multimodal Gemma 3 checkpoint (transformers 4's
/// `language_model.model.*` and transformers 5's `model.language_model.*`), `None` for the
/// vision tower's and the projector's.
pub fn text_tensor_name(name: &str) -> Option<String> {
    for (prefix, to) in [
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some(format!("{to}{rest}"));
        }
    }
    (name == "lm_head.weight").then(|| name.to_string())
}
