//! Shears models to GGUF v3 for llama.cpp, ollama and LM Studio: `llama` architecture metadata,
//! q/k rows permuted for llama.cpp's interleaved RoPE, the tokenizer as `tokenizer.ggml.*`, the
//! chat template, and the weights as F32 / F16 / BF16 or quantised (Q8_0, Q4_0, Q4_1) with
//! llama.cpp's reference rounding. The inverse of `gguf_llama` + `gguf_tokenizer`: Shears'
//! own importer reads every file written here.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as Json;

use super::dequant::GgmlType;
use super::gguf::Value;
use super::gguf_tokenizer::{known_pre_tokenizer, KNOWN_PRE_TOKENIZERS};
use super::gguf_write::{write_gguf, TensorEntry};
use super::quantize;
use crate::config::{LlamaConfig, Rope, RopeScaling};
use crate::error::{Error, Result};
use crate::layer_tensors::{LayerTensor, EMBED_TOKENS, FINAL_NORM, LM_HEAD};
use crate::model_files::ModelFiles;
use crate::tokenizer::Tokenizer;

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

/// The `llama.*` (and `general.*`) metadata of a model.
fn model_metadata(
    files: &ModelFiles,
    quant: GgufQuant,
    name: &str,
) -> Result<Vec<(String, Value)>> {
    let c = &files.config;
    let l = &files.layers[0];
    let mut kv = vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s(name)),
        ("general.file_type".into(), Value::U32(quant.file_type())),
    ];
    if matches!(quant, GgufQuant::Q8_0 | GgufQuant::Q4_0 | GgufQuant::Q4_1) {
        kv.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let hd = c.head_dim();
    kv.extend([
        ("llama.vocab_size".into(), u32v(c.vocab_size)?),
        (
            "llama.context_length".into(),
            u32v(c.max_position_embeddings)?,
        ),
        ("llama.embedding_length".into(), u32v(c.hidden_size)?),
        ("llama.block_count".into(), u32v(files.layers.len())?),
        (
            "llama.feed_forward_length".into(),
            u32v(l.intermediate_size)?,
        ),
        (
            "llama.attention.head_count".into(),
            u32v(l.num_attention_heads)?,
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32v(l.num_key_value_heads)?,
        ),
        ("llama.rope.dimension_count".into(), u32v(hd)?),
        (
            "llama.rope.freq_base".into(),
            Value::F32(rope(c)?.theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ]);
    if hd * l.num_attention_heads != c.hidden_size {
        kv.push(("llama.attention.key_length".into(), u32v(hd)?));
        kv.push(("llama.attention.value_length".into(), u32v(hd)?));
    }
    match rope(c)?.scaling {
        RopeScaling::Linear { factor } => {
            kv.push(("llama.rope.scaling.type".into(), s("linear")));
            kv.push((
                "llama.rope.scaling.factor".into(),
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
    Ok(kv)
}

/// The metadata prefix of Shears' Llama-3 rope parameters.
pub const LLAMA3_KEYS: &str = "shears.rope.llama3";

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

/// Token types of llama.cpp (`tokenizer.ggml.token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// `Json` with every `trim_offsets` key removed (it changes offsets, never ids).
fn without_offsets(v: &Json) -> Json {
    match v {
        Json::Object(m) => Json::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "trim_offsets")
                .map(|(k, v)| (k.clone(), without_offsets(v)))
                .collect(),
        ),
        Json::Array(a) => Json::Array(a.iter().map(without_offsets).collect()),
        other => other.clone(),
    }
}

/// The GGUF name of a byte-level tokenizer's pre-tokenizer, if it is one llama.cpp and Shears
/// both know.
fn pre_tokenizer_name(doc: &Json) -> Option<&'static str> {
    let have = without_offsets(doc.get("pre_tokenizer")?);
    KNOWN_PRE_TOKENIZERS.iter().find_map(|names| {
        let want = known_pre_tokenizer(names[0])?;
        (without_offsets(&want) == have).then_some(names[0])
    })
}

fn merges_of(model: &Json, path: &str) -> Result<Vec<String>> {
    let list = model
        .get("merges")
        .and_then(|m| m.as_array())
        .ok_or_else(|| Error::invalid(format!("{path}: the BPE model has no merges")))?;
    list.iter()
        .map(|m| {
            let (l, r) = match m {
                Json::String(s) => s
                    .split_once(' ')
                    .map(|(l, r)| (l.to_string(), r.to_string())),
                Json::Array(a) if a.len() == 2 => a[0]
                    .as_str()
                    .zip(a[1].as_str())
                    .map(|(l, r)| (l.to_string(), r.to_string())),
                _ => None,
            }
            .ok_or_else(|| Error::invalid(format!("{path}: merge {m} is not a pair")))?;
            if l.contains(' ') || r.contains(' ') {
                return Err(Error::invalid(format!(
                    "{path}: merge ({l:?}, {r:?}) holds a space, which GGUF's 'left right' merges cannot represent"
                )));
            }
            Ok(format!("{l} {r}"))
        })
        .collect()
}

/// The `tokenizer.ggml.*` metadata (and `tokenizer.chat_template`) of `tok` for a model with
/// `vocab_size` embedding rows. Ids the tokenizer does not use (embedding padding) become
/// unused `[PAD<id>]` tokens, as llama.cpp's converter writes them.
pub fn tokenizer_metadata(
    tok: &Tokenizer,
    vocab_size: usize,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, Value)>> {
    let path = "tokenizer.json";
    let bad = |m: String| Error::invalid(format!("{path}: {m}"));
    let doc: Json = serde_json::from_str(tok.json()).map_err(|e| bad(format!("{e}")))?;
    let model = &doc["model"];
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(bad(format!(
            "only BPE tokenizers can be exported to GGUF (this one is {})",
            model.get("type").unwrap_or(&Json::Null)
        )));
    }
    let spm = model.get("byte_fallback").and_then(|b| b.as_bool()) == Some(true);
    if tok.max_id() as usize >= vocab_size {
        return Err(bad(format!(
            "token id {} is outside the model's {vocab_size} embedding rows",
            tok.max_id()
        )));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    for (t, id) in tok.inner().get_vocab(true) {
        tokens[id as usize] = Some(t);
    }
    let mut types = vec![NORMAL; vocab_size];
    for a in doc["added_tokens"].as_array().into_iter().flatten() {
        if let Some(id) = a["id"].as_u64().filter(|&i| (i as usize) < vocab_size) {
            let special = a["special"].as_bool().unwrap_or(false);
            types[id as usize] = if special { CONTROL } else { USER_DEFINED };
        }
    }
    let unk = model["unk_token"].as_str().and_then(|u| tok.token_to_id(u));
    let mut padded = 0;
    for (id, t) in tokens.iter_mut().enumerate() {
        match t {
            None => {
                *t = Some(format!("[PAD{id}]"));
                types[id] = UNUSED;
                padded += 1;
            }
            Some(text) if spm && types[id] == NORMAL => {
                let b = text.as_bytes();
                if b.len() == 6 && text.starts_with("<0x") && text.ends_with('>') {
                    types[id] = BYTE;
                }
            }
            _ => {}
        }
    }
    if let Some(u) = unk {
        types[u as usize] = UNKNOWN;
    }
    if padded > 0 {
        warnings.push(format!(
            "{padded} embedding rows have no token in the tokenizer; they are written as unused [PAD<id>] tokens"
        ));
    }
    let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap).collect();
    let merges = merges_of(model, path)?;

    let mut kv: Vec<(String, Value)> = vec![(
        "tokenizer.ggml.model".into(),
        s(if spm { "llama" } else { "gpt2" }),
    )];
    if spm {
        // llama.cpp's SentencePiece tokenizer merges by token score: the token a merge makes
        // scores minus its rank, so the highest-scoring pair is the first merge, as in HF's BPE.
        let mut score = vec![0f32; vocab_size];
        let index: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let mut ranked = vec![false; vocab_size];
        for (rank, m) in merges.iter().enumerate() {
            let joined: String = m.split(' ').collect();
            if let Some(&id) = index.get(joined.as_str()) {
                if !ranked[id] {
                    ranked[id] = true;
                    score[id] = -(rank as f32) - 1.0;
                }
            }
        }
        for (id, t) in tokens.iter().enumerate() {
            if !ranked[id] && t.chars().count() > 1 && types[id] == NORMAL {
                score[id] = -(merges.len() as f32) - 1.0 - id as f32;
            }
        }
        let prefix = doc["normalizer"].to_string().contains("\"Prepend\"")
            || doc["pre_tokenizer"].to_string().contains("\"first\"")
            || doc["pre_tokenizer"].to_string().contains("\"always\"");
        kv.push(("tokenizer.ggml.pre".into(), s("default")));
        kv.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(prefix),
        ));
        kv.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(score.into_iter().map(Value::F32).collect()),
        ));
    } else {
        let pre = pre_tokenizer_name(&doc).unwrap_or_else(|| {
            warnings.push(
                "the tokenizer's pre-tokenizer is not one Shears can name for llama.cpp; written as 'default' (GPT-2's split), so llama.cpp may tokenize some text differently".into(),
            );
            "default"
        });
        kv.push(("tokenizer.ggml.pre".into(), s(pre)));
    }
    kv.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.iter().map(|t| s(t)).collect()),
    ));
    kv.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    kv.push((
        "tokenizer.ggml.merges".into(),
        Value::Array(merges.into_iter().map(Value::String).collect()),
    ));
    let config_id = |key: &str| -> Option<u32> {
        let v = tok.config.get(key)?;
        let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
        tok.token_to_id(text)
    };
    let bos = config_id("bos_token");
    let eos = config_id("eos_token");
    for (key, id) in [
        ("bos_token_id", bos),
        ("eos_token_id", eos),
        ("unknown_token_id", unk.or_else(|| config_id("unk_token"))),
        ("padding_token_id", config_id("pad_token")),
    ] {
        if let Some(id) = id {
            kv.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    // What the tokenizer puts around a text, read off an encoding.
    let with = tok.encode("a", true)?;
    let without = tok.encode("a", false)?;
    let add_bos = with.len() > without.len() && bos.is_some() && with.first() == bos.as_ref();
    let add_eos = with.len() > without.len() && eos.is_some() && with.last() == eos.as_ref();
    kv.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    kv.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if let Some(t) = tok.chat_template() {
        kv.push(("tokenizer.chat_template".into(), s(t)));
    }
    Ok(kv)
}

/// One tensor to write: its GGUF entry and where its data comes from.
struct Planned {
    entry: TensorEntry,
    /// HF weight name, or `None` for the rope factors.
    hf: Option<String>,
    /// Heads to permute the rows by (q and k projections).
    permute: Option<usize>,
}

/// Write `files` as a GGUF v3 `llama` model at `out` (replaced only with `overwrite`).
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
    let mut metadata = model_metadata(files, quant, name)?;
    metadata.extend(tokenizer_metadata(tok, c.vocab_size, &mut warnings)?);

    let mut names: Vec<(String, String)> = vec![("token_embd.weight".into(), EMBED_TOKENS.into())];
    for i in 0..files.layers.len() {
        for t in LayerTensor::ALL {
            names.push((format!("blk.{i}.{}", t.gguf_name()), t.key(i)));
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
            Some((_, LayerTensor::QProj | LayerTensor::KProj)) => Some(shape[0] / hd),
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
                let w = files.weights[hf].to_f32_vec();
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
