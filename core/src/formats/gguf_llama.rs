//! GGUF (llama.cpp) LLaMA-family models to Shears' one model format: HF tensor names and
//! layout, and an HF `config.json` built from the `llama.*` metadata.

use serde_json::json;

use super::gguf::GgufFile;
use crate::config::{Family, LlamaConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::layer_tensors::{LayerTensor, EMBED_TOKENS, FINAL_NORM, LM_HEAD};
use crate::tensor::{HostTensor, WeightMap};

fn arch(g: &GgufFile) -> Result<String> {
    let a = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::format(g.path(), "general.architecture is missing"))?;
    match Family::of_gguf_arch(a) {
        Some(_) => Ok(a.to_string()),
        None => Err(Error::format(
            g.path(),
            format!(
                "GGUF architecture '{a}' is not supported ({} are)",
                Family::supported_gguf()
            ),
        )),
    }
}

/// Build the HF config of a GGUF model from its metadata.
pub fn config_from_gguf(g: &GgufFile) -> Result<LlamaConfig> {
    let arch = arch(g)?;
    let path = g.path();
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| -> Result<u64> {
        g.get(&key(k)).and_then(|v| v.as_u64()).ok_or_else(|| {
            Error::format(
                path,
                format!("metadata '{}' is missing or not an integer", key(k)),
            )
        })
    };
    let opt = |k: &str| g.get(&key(k)).and_then(|v| v.as_u64());
    let hidden = req("embedding_length")?;
    let heads = req("attention.head_count")?;
    let kv = opt("attention.head_count_kv").unwrap_or(heads);
    let head_dim = opt("attention.key_length")
        .or_else(|| opt("rope.dimension_count"))
        .unwrap_or(hidden / heads.max(1));
    let vocab = match opt("vocab_size") {
        Some(v) => v,
        None => g
            .get("tokenizer.ggml.tokens")
            .and_then(|t| t.as_array())
            .map(|a| a.len() as u64)
            .ok_or_else(|| Error::format(path, "cannot tell the vocabulary size"))?,
    };
    let eps = g
        .get(&key("attention.layer_norm_rms_epsilon"))
        .and_then(|v| v.as_f64())
        .ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "metadata '{}' is missing",
                    key("attention.layer_norm_rms_epsilon")
                ),
            )
        })?;
    let theta = g
        .get(&key("rope.freq_base"))
        .and_then(|v| v.as_f64())
        .unwrap_or(10000.0);
    let ctx = opt("context_length").unwrap_or(2048);
    let tied = g.tensor_info("output.weight").is_none();

    let rope_scaling = rope_scaling_of(g, &arch, head_dim, theta)?;

    let family = Family::of_gguf_arch(&arch).unwrap_or(Family::Llama);
    let (hf_arch, model_type) = family.hf_names();
    let mut cfg = json!({
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": req("feed_forward_length")?,
        "num_hidden_layers": req("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": ctx,
        "tie_word_embeddings": tied,
        "hidden_act": if family == Family::Gemma3 { "gelu_pytorch_tanh" } else { "silu" },
    });
    let obj = cfg.as_object_mut().expect("object");
    if let Some(s) = rope_scaling {
        obj.insert("rope_scaling".into(), s);
    }
    if family == Family::Gemma3 {
        gemma3_keys(obj, g, head_dim)?;
    } else if let Some(w) = g.get(SLIDING_WINDOW_KEY).and_then(|v| v.as_u64()) {
        restore_window(obj, g, w)?;
    }
    for (hf, gg) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = g.get(gg).and_then(|v| v.as_u64()) {
            obj.insert(hf.into(), id.into());
        }
    }
    let cfg: LlamaConfig = serde_json::from_value(cfg)
        .map_err(|e| Error::format(path, format!("metadata gives an invalid config: {e}")))?;
    cfg.validate().map_err(|m| Error::format(path, m))?;
    Ok(cfg)
}

/// The block count, refused beyond what Shears supports before anything per layer is built.
fn layer_count(obj: &serde_json::Map<String, serde_json::Value>, g: &GgufFile) -> Result<u64> {
    let n = obj["num_hidden_layers"].as_u64().unwrap_or(0);
    if n > crate::config::limits::LAYERS as u64 {
        return Err(Error::format(
            g.path(),
            format!(
                "block_count {n} is beyond what Shears supports ({})",
                crate::config::limits::LAYERS
            ),
        ));
    }
    Ok(n)
}

/// The layers [`SLIDING_LAYERS_KEY`] lists, each below `n` (`None` without the key).
fn listed_layers(g: &GgufFile, n: u64) -> Result<Option<std::collections::BTreeSet<u64>>> {
    let Some(a) = g.get(SLIDING_LAYERS_KEY).and_then(|v| v.as_array()) else {
        return Ok(None);
    };
    let mut set = std::collections::BTreeSet::new();
    for v in a {
        match v.as_u64() {
            Some(l) if l < n => {
                set.insert(l);
            }
            _ => {
                return Err(Error::format(
                    g.path(),
                    format!("{SLIDING_LAYERS_KEY} lists {v:?}, not a layer of the {n}"),
                ))
            }
        }
    }
    Ok(Some(set))
}

/// The sliding window a file Shears exported records, back into the config: a `llama` file
/// with a window was a Mistral model; a `qwen2` one gets `use_sliding_window` and `layer_types`
/// for the layers the file lists.
fn restore_window(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    g: &GgufFile,
    w: u64,
) -> Result<()> {
    obj.insert("sliding_window".into(), w.into());
    let n = layer_count(obj, g)?;
    let layers: Vec<u64> = match listed_layers(g, n)? {
        Some(set) => set.into_iter().collect(),
        None => (0..n).collect(),
    };
    if obj["model_type"] == "qwen2" || obj["model_type"] == "qwen3" {
        let types: Vec<&str> = (0..n)
            .map(|l| match layers.binary_search(&l).is_ok() {
                true => "sliding_attention",
                false => "full_attention",
            })
            .collect();
        obj.insert("use_sliding_window".into(), json!(true));
        obj.insert("layer_types".into(), json!(types));
        let first = layers.first().copied().unwrap_or(n);
        obj.insert("max_window_layers".into(), json!(first));
    } else {
        if layers.len() as u64 != n {
            return Err(Error::format(
                g.path(),
                format!("{SLIDING_LAYERS_KEY} lists {} of {n} layers; a llama-architecture model windows all or none", layers.len()),
            ));
        }
        obj.insert("architectures".into(), json!(["MistralForCausalLM"]));
        obj.insert("model_type".into(), json!("mistral"));
    }
    Ok(())
}

/// Gemma 3's local layers, their RoPE base and the query scale, from llama.cpp's keys
/// (`gemma3.attention.sliding_window`, `gemma3.rope.freq_base_swa`) and what llama.cpp assumes
/// where a file has none (every sixth layer global, a local base of 10000, queries scaled by
/// `head_dim^-1/2`, or `(hidden / heads)^-1/2` for the 62-layer 27B), unless Shears' own keys
/// record the model's.
fn gemma3_keys(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    g: &GgufFile,
    head_dim: u64,
) -> Result<()> {
    let n = layer_count(obj, g)?;
    let window = g
        .get("gemma3.attention.sliding_window")
        .or_else(|| g.get(SLIDING_WINDOW_KEY))
        .and_then(|v| v.as_u64());
    let sliding = match listed_layers(g, n)? {
        Some(set) => set,
        None if window.is_some() => (0..n).filter(|l| (l + 1) % 6 != 0).collect(),
        None => Default::default(),
    };
    let types: Vec<&str> = (0..n)
        .map(|l| match sliding.contains(&l) {
            true => "sliding_attention",
            false => "full_attention",
        })
        .collect();
    obj.insert("layer_types".into(), json!(types));
    obj.insert("sliding_window".into(), json!(window));
    let local = g
        .get("gemma3.rope.freq_base_swa")
        .and_then(|v| v.as_f64())
        .unwrap_or(10_000.0);
    obj.insert("rope_local_base_freq".into(), json!(local));
    let scalar = match g.get(QUERY_SCALAR_KEY).and_then(|v| v.as_f64()) {
        Some(q) => q,
        None if n == 62 => {
            let hidden = obj["hidden_size"].as_u64().unwrap_or(0);
            let heads = obj["num_attention_heads"].as_u64().unwrap_or(1).max(1);
            (hidden / heads) as f64
        }
        None => head_dim as f64,
    };
    obj.insert("query_pre_attn_scalar".into(), json!(scalar));
    Ok(())
}

/// Where Shears' exporter records Gemma 3's `query_pre_attn_scalar` (llama.cpp derives it).
pub const QUERY_SCALAR_KEY: &str = "shears.attention.query_pre_attn_scalar";

/// Where Shears' exporter records a sliding window (llama.cpp's `llama` and `qwen2`
/// architectures have no such key; they attend over everything) ...
pub const SLIDING_WINDOW_KEY: &str = "shears.attention.sliding_window";
/// ... and the layers it applies to.
pub const SLIDING_LAYERS_KEY: &str = "shears.attention.sliding_window_layers";

/// The config's `rope_scaling` from a GGUF: llama.cpp's linear scaling keys, or Llama-3's
/// `rope_freqs.weight` (see [`llama3_scaling_from_freqs`]).
fn rope_scaling_of(
    g: &GgufFile,
    arch: &str,
    head_dim: u64,
    theta: f64,
) -> Result<Option<serde_json::Value>> {
    let path = g.path();
    let key = |k: &str| format!("{arch}.{k}");
    let mut rope_scaling = None;
    match g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
        None | Some("none") => {}
        Some("linear") => {
            let factor = g
                .get(&key("rope.scaling.factor"))
                .and_then(|v| v.as_f64())
                .ok_or_else(|| Error::format(path, "linear rope scaling without a factor"))?;
            rope_scaling = Some(json!({"rope_type": "linear", "factor": factor}));
        }
        Some(other) => {
            return Err(Error::format(
                path,
                format!("rope scaling '{other}' is not supported (linear and llama3 are)"),
            ))
        }
    }
    if let Some(info) = g.tensor_info("rope_freqs.weight") {
        let (_, freqs) = g.dequantize(info)?;
        let params = shears_llama3_params(g);
        rope_scaling = Some(
            llama3_scaling_from_freqs(&freqs, head_dim as usize, theta, params).ok_or_else(
                || {
                    Error::format(
                        path,
                        format!(
                            "rope_freqs.weight does not match Llama-3 rope scaling with {}",
                            match params {
                                Some(_) =>
                                    "the parameters under shears.rope.llama3 or any known ones",
                                None => "any known parameters",
                            }
                        ),
                    )
                },
            )?,
        );
    }

    Ok(rope_scaling)
}

/// The metadata prefix of the Llama-3 rope parameters Shears' exporter writes beside
/// `rope_freqs.weight` (llama.cpp ignores them; it reads the tensor).
pub const LLAMA3_KEYS: &str = "shears.rope.llama3";

/// The Llama-3 rope parameters Shears' exporter writes beside `rope_freqs.weight`
/// (`shears.rope.llama3.*`: factor, low and high frequency factors, original context), when
/// all four are there.
fn shears_llama3_params(g: &GgufFile) -> Option<[f64; 4]> {
    let k = LLAMA3_KEYS;
    let get = |name: &str| g.get(&format!("{k}.{name}")).and_then(|v| v.as_f64());
    Some([
        get("factor")?,
        get("low_freq_factor")?,
        get("high_freq_factor")?,
        get("original_max_position_embeddings")?,
    ])
}

/// llama.cpp stores Llama-3.1/3.2 rope scaling as per-frequency divisors (`rope_freqs.weight`)
/// rather than as parameters. Recover the parameters: those the file names under Shears' keys
/// (`given`) when they reproduce the tensor, else the published settings that do.
fn llama3_scaling_from_freqs(
    freqs: &[f32],
    head_dim: usize,
    theta: f64,
    given: Option<[f64; 4]>,
) -> Option<serde_json::Value> {
    if freqs.len() != head_dim / 2 {
        return None;
    }
    let factor = freqs.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let known = [(1.0, 4.0, 8192.0), (1.0, 4.0, 4096.0), (1.0, 2.0, 8192.0)]
        .map(|(low, high, orig)| [factor, low, high, orig]);
    for [factor, low, high, orig] in given.into_iter().chain(known) {
        let scaling = RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
        };
        let ok = freqs.iter().enumerate().all(|(i, &f)| {
            let inv = 1.0 / (theta as f32).powf(2.0 * i as f32 / head_dim as f32);
            let want = inv / scaling.scale_inv_freq(inv);
            (f - want).abs() <= 1e-4 * want.max(1.0)
        });
        if ok {
            let orig = match orig.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&orig) {
                true => json!(orig as u64),
                false => json!(orig),
            };
            return Some(
                json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": orig}),
            );
        }
    }
    None
}

/// Map a GGUF tensor name to its HF name in a model of `family`.
fn hf_name(name: &str, family: Family) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some(EMBED_TOKENS),
        "output_norm.weight" => Some(FINAL_NORM),
        "output.weight" => Some(LM_HEAD),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    Some(LayerTensor::from_gguf(suffix, family)?.key(layer))
}

/// Undo llama.cpp's row permutation of q/k projections (made for its interleaved RoPE): view
/// the rows as `[n_head, head_dim/2, 2]` and swap the last two axes.
pub fn unpermute_qk(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for a in 0..2 {
            for b in 0..half {
                let dst = h * hd + a * half + b;
                let src = h * hd + b * 2 + a;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Whether the HF tensor `name` is an RMSNorm gain.
pub fn is_norm(name: &str) -> bool {
    name == FINAL_NORM || LayerTensor::parse(name).is_some_and(|(_, t)| t.is_norm())
}

/// Dequantise every tensor of a GGUF LLaMA model to f32 under its HF name and in HF layout.
pub fn weights_from_gguf(g: &GgufFile, cfg: &LlamaConfig) -> Result<WeightMap> {
    for t in &g.tensors {
        if !t.ggml_type.is_supported() {
            return Err(Error::format(
                g.path(),
                format!(
                    "tensor '{}' has ggml type {} which Shears cannot dequantise",
                    t.name,
                    t.ggml_type.name()
                ),
            ));
        }
    }
    let mut out = WeightMap::new();
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" {
            continue; // folded into the config's rope_scaling
        }
        let name = hf_name(&t.name, cfg.family()).ok_or_else(|| {
            Error::format(
                g.path(),
                format!(
                    "unexpected tensor '{}' (not part of a LLaMA-family model)",
                    t.name
                ),
            )
        })?;
        let (shape, mut data) = g.dequantize(t)?;
        let heads = match LayerTensor::parse(&name) {
            _ if !cfg.family().gguf_permutes_qk() => None,
            Some((_, LayerTensor::QProj)) => Some(cfg.num_attention_heads),
            Some((_, LayerTensor::KProj)) => Some(cfg.num_kv_heads()),
            _ => None,
        };
        if let Some(n_head) = heads {
            if shape.len() != 2 || shape[0] % n_head != 0 || (shape[0] / n_head) % 2 != 0 {
                return Err(Error::format(
                    g.path(),
                    format!("tensor '{}' has shape {shape:?}, not [{n_head} heads x even head_dim, hidden]", t.name),
                ));
            }
            data = unpermute_qk(&data, shape[0], shape[1], n_head);
        }
        // llama.cpp stores Gemma's norm gains as applied (`1 + w`), HF the `w`.
        if cfg.family().gguf_norms_offset() && is_norm(&name) {
            data.iter_mut().for_each(|x| *x -= 1.0);
        }
        out.insert(name, HostTensor::f32(shape, data));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp's permute: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).
        let (n_head, hd, cols) = (3, 8, 2);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..n_head {
            for a in 0..2 {
                for b in 0..hd / 2 {
                    let src = h * hd + a * (hd / 2) + b;
                    let dst = h * hd + b * 2 + a;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_qk(&permuted, rows, cols, n_head), hf);
    }

    #[test]
    fn names_map() {
        let l = Family::Llama;
        assert_eq!(
            hf_name("blk.12.attn_q.weight", l).unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(hf_name("output.weight", l).unwrap(), "lm_head.weight");
        assert_eq!(
            hf_name("blk.1.attn_q.bias", l).unwrap(),
            "model.layers.1.self_attn.q_proj.bias"
        );
        assert!(hf_name("blk.1.attn_q.scale", l).is_none());
        assert_eq!(
            hf_name("blk.2.ffn_norm.weight", l).unwrap(),
            "model.layers.2.post_attention_layernorm.weight"
        );
        let g = Family::Gemma3;
        assert_eq!(
            hf_name("blk.2.ffn_norm.weight", g).unwrap(),
            "model.layers.2.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name("blk.2.post_attention_norm.weight", g).unwrap(),
            "model.layers.2.post_attention_layernorm.weight"
        );
    }

    #[test]
    fn llama3_freqs_recovered() {
        let (hd, theta) = (64usize, 500000.0);
        let scaling = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let freqs: Vec<f32> = (0..hd / 2)
            .map(|i| {
                let inv = 1.0 / (theta as f32).powf(2.0 * i as f32 / hd as f32);
                inv / scaling.scale_inv_freq(inv)
            })
            .collect();
        let s = llama3_scaling_from_freqs(&freqs, hd, theta, None).unwrap();
        assert_eq!(s["factor"], 32.0);
        assert_eq!(s["original_max_position_embeddings"], 8192);
        // Factors outside the published sets come back only when the file names them (as
        // Shears' exporter does), and only if they reproduce the tensor.
        let custom = [16.0, 2.0, 8.0, 4096.0];
        let scaling = RopeScaling::Llama3 {
            factor: custom[0],
            low_freq_factor: custom[1],
            high_freq_factor: custom[2],
            original_max_position_embeddings: custom[3],
        };
        let freqs: Vec<f32> = (0..hd / 2)
            .map(|i| {
                let inv = 1.0 / (theta as f32).powf(2.0 * i as f32 / hd as f32);
                inv / scaling.scale_inv_freq(inv)
            })
            .collect();
        assert!(llama3_scaling_from_freqs(&freqs, hd, theta, None).is_none());
        let s = llama3_scaling_from_freqs(&freqs, hd, theta, Some(custom)).unwrap();
        assert_eq!(s["low_freq_factor"], 2.0);
        assert_eq!(s["high_freq_factor"], 8.0);
        assert_eq!(s["original_max_position_embeddings"], 4096);
        let wrong = [16.0, 1.0, 8.0, 4096.0];
        assert!(llama3_scaling_from_freqs(&freqs, hd, theta, Some(wrong)).is_none());
    }
}
