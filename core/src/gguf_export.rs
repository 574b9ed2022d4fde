//! Shears models to GGUF v3 for llama.cpp, ollama and LM Studio: the metadata of llama.cpp's
//! architecture for the model's family (`llama`, `qwen2`, `qwen3`, `gemma3`), q/k rows permuted
//! for the `llama` architecture's interleaved RoPE, Gemma's norm gains stored as applied
//! (`1 + w`), the tokenizer as `tokenizer.ggml.*`, the
//! chat template, and the weights as F32 / F16 / BF16 or quantised (Q8_0, Q4_0, Q4_1) with
//! llama.cpp's reference rounding. The inverse of `formats::gguf_llama` +
//! `formats::gguf_tokenizer` (the tokenizer's half is `formats::gguf_vocab`): Shears' own
//! importer reads every file written here.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::Family;
use crate::config::{LlamaConfig, Rope, RopeScaling};
use crate::error::{Error, Result};
use crate::formats::dequant::GgmlType;
use crate::formats::gguf::Value;
use crate::formats::gguf_llama::{
    is_norm, LLAMA3_KEYS, QUERY_SCALAR_KEY, SLIDING_LAYERS_KEY, SLIDING_WINDOW_KEY,
};
use crate::formats::gguf_vocab::tokenizer_metadata;
use crate::formats::gguf_write::{write_gguf, TensorEntry};
use crate::formats::quantize;
use crate::layer_tensors::{LayerTensor, EMBED_TOKENS, FINAL_NORM, LM_HEAD};
use crate::model_files::ModelFiles;

/// How the weight matrices are stored (norms and rope factors always stay F32, as llama.cpp's
/// converter keeps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl std::str::FromStr for GgufQuant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => GgufQuant::F32,
            "f16" => GgufQuant::F16,
            "bf16" => GgufQuant::BF16,
            "q8_0" => GgufQuant::Q8_0,
            "q4_0" => GgufQuant::Q4_0,
            "q4_1" => GgufQuant::Q4_1,
            other => {
                return Err(format!(
                    "unknown GGUF type '{other}' (expected f32, f16, bf16, q8_0, q4_0 or q4_1)"
                ))
            }
        })
    }
}

impl GgufQuant {
    /// The ggml storage type of a weight matrix.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            GgufQuant::F32 => GgmlType::F32,
            GgufQuant::F16 => GgmlType::F16,
            GgufQuant::BF16 => GgmlType::BF16,
            GgufQuant::Q8_0 => GgmlType::Q8_0,
            GgufQuant::Q4_0 => GgmlType::Q4_0,
            GgufQuant::Q4_1 => GgmlType::Q4_1,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F32 => 0,
            GgufQuant::F16 => 1,
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q4_1 => 3,
            GgufQuant::Q8_0 => 7,
            GgufQuant::BF16 => 32,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    /// Tensors written per storage type name.
    pub tensors_by_type: BTreeMap<String, usize>,
    /// Matrices stored as F16 because their rows are not whole quantisation blocks.
    pub fallbacks: Vec<String>,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Things a user should know (a pre-tokenizer llama.cpp will not recognise, ...).
    pub warnings: Vec<String>,
}

/// llama.cpp's q/k row permutation for its interleaved RoPE (`permute` in
/// `convert_hf_to_gguf.py`): rows viewed as `[n_head, 2, head_dim/2]`, last two axes swapped.
pub fn permute_qk(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for a in 0..2 {
            for b in 0..half {
                let src = h * hd + a * half + b;
                let dst = h * hd + b * 2 + a;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn u32v(n: usize) -> Result<Value> {
    u32::try_from(n)
        .map(Value::U32)
        .map_err(|_| Error::invalid(format!("{n} does not fit GGUF's 32-bit field")))
}

/// The `<arch>.*` (and `general.*`) metadata of a model (`arch`: llama.cpp's architecture
/// of its family).
fn model_metadata(
    files: &ModelFiles,
    quant: GgufQuant,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, Value)>> {
    let c = &files.config;
    let l = &files.layers[0];
    let arch = c.family().gguf_arch();
    let mut kv = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s(name)),
        ("general.file_type".into(), Value::U32(quant.file_type())),
    ];
    if matches!(quant, GgufQuant::Q8_0 | GgufQuant::Q4_0 | GgufQuant::Q4_1) {
        kv.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let hd = c.head_dim();
    kv.extend([
        (format!("{arch}.vocab_size"), u32v(c.vocab_size)?),
        (
            format!("{arch}.context_length"),
            u32v(c.max_position_embeddings)?,
        ),
        (format!("{arch}.embedding_length"), u32v(c.hidden_size)?),
        (format!("{arch}.block_count"), u32v(files.layers.len())?),
        (
            format!("{arch}.feed_forward_length"),
            u32v(l.intermediate_size)?,
        ),
        (
            format!("{arch}.attention.head_count"),
            u32v(l.num_attention_heads)?,
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(l.num_key_value_heads)?,
        ),
        (format!("{arch}.rope.dimension_count"), u32v(hd)?),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(rope(c)?.theta as f32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ]);
    if hd * l.num_attention_heads != c.hidden_size {
        kv.push((format!("{arch}.attention.key_length"), u32v(hd)?));
        kv.push((format!("{arch}.attention.value_length"), u32v(hd)?));
    }
    match rope(c)?.scaling {
        RopeScaling::Linear { factor } => {
            kv.push((format!("{arch}.rope.scaling.type"), s("linear")));
            kv.push((
                format!("{arch}.rope.scaling.factor"),
                Value::F32(factor as f32),
            ));
        }
        // llama.cpp reads Llama-3 scaling from `rope_freqs.weight` alone; the parameters go
        // under Shears' own keys (which llama.cpp ignores), so Shears reads back exactly the
        // config it wrote, whatever the factors.
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            for (k, v) in [
                ("factor", factor),
                ("low_freq_factor", low_freq_factor),
                ("high_freq_factor", high_freq_factor),
                (
                    "original_max_position_embeddings",
                    original_max_position_embeddings,
                ),
            ] {
                kv.push((format!("{LLAMA3_KEYS}.{k}"), Value::F64(v)));
            }
        }
        RopeScaling::None => {}
    }
    if c.family() == Family::Gemma3 {
        kv.extend(gemma3_metadata(c, warnings)?);
    } else {
        kv.extend(window_metadata(c, warnings)?);
    }
    Ok(kv)
}

/// Gemma 3's local layers (llama.cpp's `gemma3.attention.sliding_window`, and Shears' list of
/// them), their RoPE base and the query scale. llama.cpp fixes what it does not read (every
/// sixth layer global, the query scale from the head width), so the export warns where the
/// model differs, e.g. after layers were pruned.
fn gemma3_metadata(c: &LlamaConfig, warnings: &mut Vec<String>) -> Result<Vec<(String, Value)>> {
    let n = c.num_hidden_layers;
    let sliding: Vec<usize> = (0..n)
        .filter(|&l| c.attention_window(l).is_some())
        .collect();
    let local = c
        .rope_of_layer(sliding.first().copied().unwrap_or(0))
        .map_err(Error::invalid)?;
    let scalar = c.query_pre_attn_scalar();
    let mut kv = vec![
        (
            "gemma3.rope.freq_base_swa".into(),
            Value::F32(local.theta as f32),
        ),
        (QUERY_SCALAR_KEY.into(), Value::F64(scalar)),
        (
            SLIDING_LAYERS_KEY.into(),
            Value::Array(sliding.iter().map(|&l| u32v(l)).collect::<Result<_>>()?),
        ),
    ];
    if let Some(w) = c.sliding_window.filter(|_| !sliding.is_empty()) {
        kv.push(("gemma3.attention.sliding_window".into(), u32v(w)?));
    }
    let llama_cpp_sliding: Vec<usize> = (0..n).filter(|l| (l + 1) % 6 != 0).collect();
    let mut differs = vec![];
    if sliding != llama_cpp_sliding {
        differs
            .push("which layers are local (llama.cpp makes every sixth layer global)".to_string());
    }
    if local.theta != 10_000.0 || local.scaling != RopeScaling::None {
        differs.push(format!(
            "the local RoPE (base {}, llama.cpp uses 10000)",
            local.theta
        ));
    }
    let llama_cpp_scalar = match n {
        62 => (c.hidden_size / c.num_attention_heads.max(1)) as f64,
        _ => c.head_dim() as f64,
    };
    if scalar != llama_cpp_scalar {
        differs.push(format!(
            "query_pre_attn_scalar {scalar} (llama.cpp uses {llama_cpp_scalar})"
        ));
    }
    if !differs.is_empty() {
        warnings.push(format!(
            "llama.cpp's gemma3 architecture will not run this model as Shears does: it differs in {}; Shears reads the model's own settings back",
            differs.join(", ")
        ));
    }
    Ok(kv)
}

/// A sliding window under Shears' own keys (the window and the layers it applies to): llama.cpp
/// has no such key for the `llama` and `qwen2` architectures and attends over everything, so
/// the export warns; Shears reads the windows back.
fn window_metadata(c: &LlamaConfig, warnings: &mut Vec<String>) -> Result<Vec<(String, Value)>> {
    let layers: Vec<usize> = (0..c.num_hidden_layers)
        .filter(|&l| c.attention_window(l).is_some())
        .collect();
    let Some(w) = layers.first().and_then(|&l| c.attention_window(l)) else {
        return Ok(vec![]);
    };
    warnings.push(format!(
        "the model attends over a sliding window of {w} tokens in {} of its {} layers; llama.cpp \
         runs the `{}` architecture with full attention, so its scores differ from Shears' past \
         {w} tokens (Shears reads the window back from {SLIDING_WINDOW_KEY})",
        layers.len(),
        c.num_hidden_layers,
        c.family().gguf_arch()
    ));
    Ok(vec![
        (SLIDING_WINDOW_KEY.into(), u32v(w)?),
        (
            SLIDING_LAYERS_KEY.into(),
            Value::Array(layers.into_iter().map(u32v).collect::<Result<_>>()?),
        ),
    ])
}

fn rope(c: &LlamaConfig) -> Result<Rope> {
    c.rope()
        .map_err(|m| Error::invalid(format!("the model's rope settings cannot be exported: {m}")))
}

/// Llama-3 rope scaling as llama.cpp stores it: per-frequency divisors (`rope_freqs.weight`).
fn rope_freqs(c: &LlamaConfig) -> Result<Option<Vec<f32>>> {
    let Rope { theta, scaling } = rope(c)?;
    if !matches!(scaling, RopeScaling::Llama3 { .. }) {
        return Ok(None);
    }
    let hd = c.head_dim();
    Ok(Some(
        (0..hd / 2)
            .map(|i| {
                let inv = 1.0 / (theta as f32).powf(2.0 * i as f32 / hd as f32);
                inv / scaling.scale_inv_freq(inv)
            })
            .collect(),
    ))
}

/// One tensor to write: its GGUF entry and where its data comes from.
struct Planned {
    entry: TensorEntry,
    /// HF weight name, or `None` for the rope factors.
    hf: Option<String>,
    /// Heads to permute the rows by (q and k projections).
    permute: Option<usize>,
}

/// Write `files` as a GGUF v3 model of its family's llama.cpp architecture at `out` (replaced only with `overwrite`).
/// `name` goes into `general.name`.
pub fn write_llama_gguf(
    files: &ModelFiles,
    quant: GgufQuant,
    name: &str,
    out: &Path,
    overwrite: bool,
) -> Result<GgufExport> {
    if !files.is_uniform() {
        return Err(Error::invalid(
            "the model has per-layer widths; GGUF export writes uniform models only",
        ));
    }
    crate::fsutil::check_output_apart(out, [("model", files.source.as_path())])?;
    let tok = files.tokenizer.as_ref().ok_or_else(|| {
        Error::invalid("the model has no tokenizer.json; a GGUF file needs its tokenizer")
    })?;
    let c = &files.config;
    let mut warnings = vec![];
    let mut metadata = model_metadata(files, quant, name, &mut warnings)?;
    metadata.extend(tokenizer_metadata(tok, c.vocab_size, &mut warnings)?);

    let mut names: Vec<(String, String)> = vec![("token_embd.weight".into(), EMBED_TOKENS.into())];
    for i in 0..files.layers.len() {
        for t in LayerTensor::of(c) {
            names.push((format!("blk.{i}.{}", t.gguf_name(c.family())), t.key(i)));
        }
    }
    names.push(("output_norm.weight".into(), FINAL_NORM.into()));
    if files.weights.contains_key(LM_HEAD) {
        names.push(("output.weight".into(), LM_HEAD.into()));
    }
    let mut plan = vec![];
    let mut fallbacks = vec![];
    let freqs = rope_freqs(c)?;
    if let Some(f) = &freqs {
        plan.push(Planned {
            entry: TensorEntry {
                name: "rope_freqs.weight".into(),
                shape: vec![f.len()],
                ty: GgmlType::F32,
            },
            hf: None,
            permute: None,
        });
    }
    let hd = c.head_dim();
    for (gguf, hf) in names {
        let w = files
            .weights
            .get(&hf)
            .ok_or_else(|| Error::invalid(format!("the model has no tensor {hf}")))?;
        let shape = w.shape.clone();
        let ty = if shape.len() == 1 {
            GgmlType::F32
        } else {
            let want = quant.ggml_type();
            if shape[shape.len() - 1] % want.block().0 == 0 {
                want
            } else {
                fallbacks.push(gguf.clone());
                GgmlType::F16
            }
        };
        let permute = match LayerTensor::parse(&hf) {
            Some((_, LayerTensor::QProj | LayerTensor::KProj)) if c.family().gguf_permutes_qk() => {
                Some(shape[0] / hd)
            }
            _ => None,
        };
        plan.push(Planned {
            entry: TensorEntry {
                name: gguf,
                shape,
                ty,
            },
            hf: Some(hf),
            permute,
        });
    }
    let entries: Vec<TensorEntry> = plan.iter().map(|p| p.entry.clone()).collect();
    write_gguf(out, overwrite, &metadata, &entries, |i| {
        let p = &plan[i];
        let data = match &p.hf {
            None => freqs.clone().expect("planned only with rope factors"),
            Some(hf) => {
                let mut w = files.weights[hf].to_f32_vec();
                // llama.cpp stores Gemma's norm gains as applied (`1 + w`).
                if c.family().gguf_norms_offset() && is_norm(hf) {
                    w.iter_mut().for_each(|x| *x += 1.0);
                }
                match p.permute {
                    Some(heads) => permute_qk(&w, p.entry.shape[0], p.entry.shape[1], heads),
                    None => w,
                }
            }
        };
        let mut bytes = Vec::new();
        quantize::encode(p.entry.ty, &data, &mut bytes);
        Ok(bytes)
    })?;
    let mut tensors_by_type = BTreeMap::new();
    for e in &entries {
        *tensors_by_type.entry(e.ty.name()).or_insert(0) += 1;
    }
    if !fallbacks.is_empty() {
        warnings.push(format!(
            "{} matrices have rows that are not whole {}-element blocks and are stored as F16: {}",
            fallbacks.len(),
            quantize::QK,
            fallbacks.join(", ")
        ));
    }
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(GgufExport {
        tensors_by_type,
        fallbacks,
        bytes,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf_llama::unpermute_qk;

    #[test]
    fn permute_is_inverted_by_the_importer() {
        let (n_head, hd, cols) = (3, 8, 5);
        let w: Vec<f32> = (0..n_head * hd * cols).map(|x| x as f32).collect();
        let p = permute_qk(&w, n_head * hd, cols, n_head);
        assert_ne!(p, w);
        assert_eq!(unpermute_qk(&p, n_head * hd, cols, n_head), w);
    }

    #[test]
    fn quant_names_parse() {
        assert_eq!("Q8_0".parse::<GgufQuant>().unwrap(), GgufQuant::Q8_0);
        assert_eq!("bf16".parse::<GgufQuant>().unwrap(), GgufQuant::BF16);
        assert!("q5_k".parse::<GgufQuant>().unwrap_err().contains("q4_1"));
    }
}
