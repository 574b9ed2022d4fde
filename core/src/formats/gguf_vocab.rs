//! A tokenizer as GGUF `tokenizer.ggml.*` metadata, the export direction of
//! [`super::gguf_tokenizer`]: tokens, llama.cpp token types, merges (and SentencePiece scores),
//! the pre-tokenizer's name, special ids and the chat template.

use serde_json::Value as Json;

use super::gguf::Value;
use super::gguf_tokenizer::{known_pre_tokenizer, KNOWN_PRE_TOKENIZERS};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

fn s(v: &str) -> Value {
    Value::String(v.to_string())
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

/// The token strings and llama.cpp token types of `tok` for `vocab_size` embedding rows, and
/// its unknown token. Ids the tokenizer does not use (embedding padding) become unused
/// `[PAD<id>]` tokens, as llama.cpp's converter writes them.
fn token_table(
    tok: &Tokenizer,
    doc: &Json,
    vocab_size: usize,
    spm: bool,
    warnings: &mut Vec<String>,
) -> (Vec<String>, Vec<i32>, Option<u32>) {
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
    let unk = doc["model"]["unk_token"]
        .as_str()
        .and_then(|u| tok.token_to_id(u));
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
    (tokens.into_iter().map(Option::unwrap).collect(), types, unk)
}

/// llama.cpp's SentencePiece tokenizer merges by token score: the token a merge makes scores
/// minus its rank, so the highest-scoring pair is the first merge, as in HF's BPE; other
/// multi-character tokens score below every merge.
fn spm_scores(tokens: &[String], types: &[i32], merges: &[String]) -> Vec<f32> {
    let mut score = vec![0f32; tokens.len()];
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut ranked = vec![false; tokens.len()];
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
    score
}

/// The tokenizer model's own keys: `tokenizer.ggml.pre`, and for SentencePiece the space
/// prefix and the scores.
fn model_keys(
    doc: &Json,
    spm: bool,
    tokens: &[String],
    types: &[i32],
    merges: &[String],
    warnings: &mut Vec<String>,
) -> Vec<(String, Value)> {
    if spm {
        let prefix = doc["normalizer"].to_string().contains("\"Prepend\"")
            || doc["pre_tokenizer"].to_string().contains("\"first\"")
            || doc["pre_tokenizer"].to_string().contains("\"always\"");
        let score = spm_scores(tokens, types, merges);
        return vec![
            ("tokenizer.ggml.pre".into(), s("default")),
            (
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(prefix),
            ),
            (
                "tokenizer.ggml.scores".into(),
                Value::Array(score.into_iter().map(Value::F32).collect()),
            ),
        ];
    }
    let pre = pre_tokenizer_name(doc).unwrap_or_else(|| {
        warnings.push(
            "the tokenizer's pre-tokenizer is not one Shears can name for llama.cpp; written as 'default' (GPT-2's split), so llama.cpp may tokenize some text differently".into(),
        );
        "default"
    });
    vec![("tokenizer.ggml.pre".into(), s(pre))]
}

/// The special token ids (`bos`, `eos`, `unknown`, `padding`), whether the tokenizer adds BOS
/// and EOS around a text (read off an encoding), and the chat template.
fn special_keys(tok: &Tokenizer, unk: Option<u32>) -> Result<Vec<(String, Value)>> {
    let config_id = |key: &str| -> Option<u32> {
        let v = tok.config.get(key)?;
        let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
        tok.token_to_id(text)
    };
    let bos = config_id("bos_token");
    let eos = config_id("eos_token");
    let mut kv = vec![];
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

/// The `tokenizer.ggml.*` metadata (and `tokenizer.chat_template`) of `tok` for a model with
/// `vocab_size` embedding rows; ids the tokenizer does not use (embedding padding) become unused
/// `[PAD<id>]` tokens, as llama.cpp's converter writes them.
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
    let (tokens, types, unk) = token_table(tok, &doc, vocab_size, spm, warnings);
    let merges = merges_of(model, path)?;
    let mut kv: Vec<(String, Value)> = vec![(
        "tokenizer.ggml.model".into(),
        s(if spm { "llama" } else { "gpt2" }),
    )];
    kv.extend(model_keys(&doc, spm, &tokens, &types, &merges, warnings));
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
    kv.extend(special_keys(tok, unk)?);
    Ok(kv)
}
