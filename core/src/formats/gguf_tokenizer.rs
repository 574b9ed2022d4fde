//! GGUF tokenizer metadata (`tokenizer.ggml.*`) rebuilt as an HF `tokenizer.json`, for the two
//! tokenizer models llama.cpp writes for LLaMA families: SentencePiece-style BPE (`llama`: scores
//! or merges, byte fallback, BOS) and byte-level BPE (`gpt2`) with the pre-tokenizer named by
//! `tokenizer.ggml.pre`.

use serde_json::{json, Map, Value};

use super::gguf::GgufFile;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// 0, or any value llama.cpp does not define.
    Undefined,
    /// 1: ordinary vocabulary.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: control tokens (BOS, EOS, chat markers): special, matched whole, skippable on decode.
    Control,
    /// 4: user-defined tokens: matched whole but ordinary text.
    UserDefined,
    /// 5: unused slots.
    Unused,
    /// 6: byte tokens (`<0x41>`) of byte fallback.
    Byte,
}

impl TokenType {
    /// The type of a `token_type` value.
    pub fn from_id(id: i64) -> Self {
        match id {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

// The pre-tokenisation regex of Llama-3's tokenizer.json.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The vocabulary part of a GGUF's tokenizer metadata, checked.
struct GgufVocab {
    tokens: Vec<String>,
    types: Option<Vec<TokenType>>,
    bos: Option<usize>,
    eos: Option<usize>,
    unk: Option<usize>,
    pad: Option<usize>,
}

impl GgufVocab {
    fn read(g: &GgufFile) -> Result<GgufVocab> {
        let bad = |m: String| Error::format(g.path(), m);
        let tokens: Vec<String> = g
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("tokenizer.ggml.tokens missing".into()))?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("tokenizer.ggml.tokens must be strings".into()))?;
        let types: Option<Vec<TokenType>> = g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|v| v.as_i64().map_or(TokenType::Normal, TokenType::from_id))
                    .collect()
            });
        if let Some(t) = &types {
            if t.len() != tokens.len() {
                return Err(bad(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                )));
            }
        }
        let id_key = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let v = GgufVocab {
            bos: id_key("tokenizer.ggml.bos_token_id"),
            eos: id_key("tokenizer.ggml.eos_token_id"),
            unk: id_key("tokenizer.ggml.unknown_token_id"),
            pad: id_key("tokenizer.ggml.padding_token_id"),
            tokens,
            types,
        };
        for (name, id) in [
            ("bos", v.bos),
            ("eos", v.eos),
            ("unknown", v.unk),
            ("padding", v.pad),
        ] {
            if let Some(id) = id.filter(|&id| id >= v.tokens.len()) {
                return Err(bad(format!(
                    "tokenizer.ggml.{name}_token_id {id} is outside the {}-token vocabulary",
                    v.tokens.len()
                )));
            }
        }
        Ok(v)
    }

    /// Control tokens are special (matched whole in raw text, skippable when decoding);
    /// user-defined tokens are matched whole but are ordinary text.
    fn added_tokens(&self, is_spm: bool) -> Vec<Value> {
        let mut added = vec![];
        for (id, tok) in self.tokens.iter().enumerate() {
            let ty = self.types.as_ref().map(|t| t[id]).unwrap_or({
                if Some(id) == self.bos || Some(id) == self.eos || Some(id) == self.unk {
                    TokenType::Control
                } else {
                    TokenType::Normal
                }
            });
            let special = ty == TokenType::Control || (ty == TokenType::Unknown && is_spm);
            if special || ty == TokenType::UserDefined {
                added.push(
                    json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special}),
                );
            }
        }
        added
    }

    /// The post-processor adding BOS and/or EOS.
    fn template(&self, add_bos: bool, add_eos: bool) -> Value {
        let named = |id: Option<usize>| id.map(|i| (i, self.tokens[i].as_str()));
        post_processor(
            add_bos.then(|| named(self.bos)).flatten(),
            add_eos.then(|| named(self.eos)).flatten(),
        )
    }
}

/// The parts of a tokenizer.json both GGUF tokenizer models share.
struct Parts {
    added: Vec<Value>,
    vocab: Map<String, Value>,
    merges: Vec<Value>,
    add_bos: bool,
    add_eos: bool,
}

/// A SentencePiece-style (`llama`) tokenizer.json: byte-fallback BPE with `▁` for spaces.
fn spm_document(g: &GgufFile, v: &GgufVocab, p: Parts) -> Value {
    let prefix = g
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let mut normalizers = vec![];
    if prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": p.added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": v.template(p.add_bos, p.add_eos),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": v.unk.map(|i| v.tokens[i].clone()),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": p.vocab, "merges": p.merges}
    })
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The GGUF pre-tokenizer names (`tokenizer.ggml.pre`) Shears knows, with the first name being
/// the one the GGUF writer uses.
pub const KNOWN_PRE_TOKENIZERS: [&[&str]; 3] = [
    &["smollm"],
    &["llama-bpe", "llama3", "llama-v3"],
    &["gpt-2", "gpt2", "default"],
];

/// The tokenizer.json pre-tokenizer of a GGUF pre-tokenizer name, if Shears knows it.
pub fn known_pre_tokenizer(name: &str) -> Option<Value> {
    Some(match name {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        _ => return None,
    })
}

/// A GPT-2-style (`gpt2`) tokenizer.json: byte-level BPE with the pre-tokenizer the GGUF names.
fn bpe_document(g: &GgufFile, v: &GgufVocab, p: Parts, warnings: &mut Vec<String>) -> Value {
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let pre_tokenizer = known_pre_tokenizer(pre).unwrap_or_else(|| {
        warnings.push(format!(
            "GGUF pre-tokenizer '{pre}' is not known to Shears; using GPT-2's byte-level split, which may tokenize some text differently from llama.cpp"
        ));
        byte_level(true)
    });
    let post = if p.add_bos || p.add_eos {
        v.template(p.add_bos, p.add_eos)
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": p.added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": p.vocab, "merges": p.merges}
    })
}

impl Tokenizer {
    /// Rebuild the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let bad = |m: String| Error::format(g.path(), m);
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("GGUF has no tokenizer (tokenizer.ggml.model missing)".into()))?;
        let is_spm = model == "llama";
        if !is_spm && model != "gpt2" {
            return Err(bad(format!(
                "GGUF tokenizer model '{model}' is not supported (gpt2 and llama are)"
            )));
        }
        let v = GgufVocab::read(g)?;
        let flag = |k: &str| g.get(k).and_then(|v| v.as_bool());
        let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(is_spm);
        let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
        let mut warnings = vec![];
        let vocab: Map<String, Value> = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        if vocab.len() != v.tokens.len() {
            warnings.push(format!(
                "the GGUF vocabulary repeats {} token strings; later ids win when encoding",
                v.tokens.len() - vocab.len()
            ));
        }
        let merges = read_merges(g, &v.tokens, is_spm)?
            .into_iter()
            .map(|(l, r)| json!([l, r]))
            .collect();
        let parts = Parts {
            added: v.added_tokens(is_spm),
            vocab,
            merges,
            add_bos,
            add_eos,
        };
        let doc = if is_spm {
            spm_document(g, &v, parts)
        } else {
            bpe_document(g, &v, parts, &mut warnings)
        };
        let config = tokenizer_config(g, &v.tokens, add_bos, add_eos, [v.bos, v.eos, v.unk, v.pad]);
        let json = serde_json::to_string(&doc).expect("tokenizer json");
        let mut tok = Self::from_json(json, config, g.path())?;
        tok.warnings.extend(warnings);
        Ok(tok)
    }
}

/// The merges: `tokenizer.ggml.merges` when present, else (SentencePiece) recovered from the
/// scores.
fn read_merges(g: &GgufFile, tokens: &[String], is_spm: bool) -> Result<Vec<(String, String)>> {
    let bad = |m: String| Error::format(g.path(), m);
    Ok(
        match g.get("tokenizer.ggml.merges").and_then(|v| v.as_array()) {
            Some(a) => a
                .iter()
                .map(|m| {
                    m.as_str()
                        .and_then(|s| s.split_once(' '))
                        .map(|(l, r)| (l.to_string(), r.to_string()))
                        .ok_or_else(|| {
                            bad(format!(
                                "tokenizer.ggml.merges entry {m:?} is not 'left right'"
                            ))
                        })
                })
                .collect::<Result<_>>()?,
            None if is_spm => {
                let scores: Vec<f64> = g
                .get("tokenizer.ggml.scores")
                .and_then(|v| v.as_array())
                .ok_or_else(|| bad("a llama (SentencePiece) tokenizer needs tokenizer.ggml.scores or merges".into()))?
                .iter()
                .map(|v| v.as_f64().unwrap_or(0.0))
                .collect();
                if scores.len() != tokens.len() {
                    return Err(bad(
                        "tokenizer.ggml.scores and tokens differ in length".into()
                    ));
                }
                merges_from_scores(tokens, &scores).map_err(bad)?
            }
            None => {
                return Err(bad(
                    "a gpt2 (byte-level BPE) tokenizer needs tokenizer.ggml.merges".into(),
                ))
            }
        },
    )
}

/// HF's `TemplateProcessing` that puts `bos` before and `eos` after every sequence (each given
/// as id and string, or absent).
fn post_processor(bos: Option<(usize, &str)>, eos: Option<(usize, &str)>) -> Value {
    let mut single = vec![];
    let mut pair = vec![];
    let mut specials = Map::new();
    if let Some((id, b)) = bos {
        single.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
        specials.insert(b.to_string(), json!({"id": b, "ids": [id], "tokens": [b]}));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some((id, e)) = eos {
        single.push(json!({"SpecialToken": {"id": e, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": e, "type_id": 0}}));
        specials.insert(e.to_string(), json!({"id": e, "ids": [id], "tokens": [e]}));
    }
    if let Some((_, b)) = bos {
        pair.push(json!({"SpecialToken": {"id": b, "type_id": 1}}));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let Some((_, e)) = eos {
        pair.push(json!({"SpecialToken": {"id": e, "type_id": 1}}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// `tokenizer_config.json`: BOS/EOS behaviour, the special tokens, the context length and the
/// chat template.
fn tokenizer_config(
    g: &GgufFile,
    tokens: &[String],
    add_bos: bool,
    add_eos: bool,
    ids: [Option<usize>; 4],
) -> Map<String, Value> {
    let mut config = Map::new();
    config.insert("add_bos_token".into(), add_bos.into());
    config.insert("add_eos_token".into(), add_eos.into());
    config.insert("clean_up_tokenization_spaces".into(), false.into());
    config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    for (k, id) in ["bos_token", "eos_token", "unk_token", "pad_token"]
        .into_iter()
        .zip(ids)
    {
        if let Some(id) = id {
            config.insert(k.into(), tokens[id].clone().into());
        }
    }
    if let Some(ctx) = g
        .get(&format!(
            "{}.context_length",
            g.get("general.architecture")
                .and_then(|v| v.as_str())
                .unwrap_or("llama")
        ))
        .and_then(|v| v.as_u64())
    {
        config.insert("model_max_length".into(), ctx.into());
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        config.insert("chat_template".into(), t.into());
    }
    config
}

/// SentencePiece BPE merges recovered from token scores: every split of a token into two vocabulary
/// tokens is a merge, ranked by the merged token's score (highest first), then by the scores of its
/// halves, as HF's converter ranks them.
///
/// The work grows with the square of a token's length, so a vocabulary with a token longer than
/// [`MAX_SPM_TOKEN_BYTES`] (real SentencePiece vocabularies stay far below) or more than
/// [`MAX_SPM_MERGES_PER_TOKEN`] merges per token on average is refused.
fn merges_from_scores(
    tokens: &[String],
    scores: &[f64],
) -> std::result::Result<Vec<(String, String)>, String> {
    if let Some(t) = tokens.iter().find(|t| t.len() > MAX_SPM_TOKEN_BYTES) {
        return Err(format!(
            "a SentencePiece token of {} bytes (limit {MAX_SPM_TOKEN_BYTES}) starting {:?}: not a real vocabulary",
            t.len(),
            t.chars().take(16).collect::<String>()
        ));
    }
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let budget = MAX_SPM_MERGES_PER_TOKEN * tokens.len().max(1);
    // (merged token, cut, left, right): strings are made only for the kept merges.
    let mut merges: Vec<(usize, usize, usize, usize)> = vec![];
    for (ti, tok) in tokens.iter().enumerate() {
        for (cut, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(cut);
            if let (Some(&il), Some(&ir)) = (index.get(l), index.get(r)) {
                merges.push((ti, cut, il, ir));
                if merges.len() > budget {
                    return Err(format!(
                        "the SentencePiece scores imply more than {budget} merges ({MAX_SPM_MERGES_PER_TOKEN} per token): not a real vocabulary"
                    ));
                }
            }
        }
    }
    merges.sort_by(|a, b| {
        scores[b.0]
            .total_cmp(&scores[a.0])
            .then(scores[b.2].total_cmp(&scores[a.2]))
            .then(scores[b.3].total_cmp(&scores[a.3]))
    });
    Ok(merges
        .into_iter()
        .map(|(t, cut, _, _)| {
            let (l, r) = tokens[t].split_at(cut);
            (l.to_string(), r.to_string())
        })
        .collect())
}

/// Longest SentencePiece token whose merges are recovered (Llama-2's longest is 16 bytes).
const MAX_SPM_TOKEN_BYTES: usize = 256;
/// Average merges per token allowed (Llama-2's 32,000 tokens give about 2 each).
const MAX_SPM_MERGES_PER_TOKEN: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spm_merges_rank_by_score() {
        let toks: Vec<String> = ["a", "b", "ab", "c", "abc", "bc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, -1.0, 0.0, -3.0, -2.0];
        let m = merges_from_scores(&toks, &scores).unwrap();
        assert_eq!(m[0], ("a".into(), "b".into()));
        assert_eq!(m[1], ("b".into(), "c".into()));
        assert!(m[2..].contains(&("ab".into(), "c".into())));
        assert!(m[2..].contains(&("a".into(), "bc".into())));
    }
}
