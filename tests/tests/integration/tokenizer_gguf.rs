//! Tokenizers rebuilt from GGUF metadata for the two tokenizer models llama.cpp writes for LLaMA
//! families: SentencePiece-style BPE (`llama`: scores, byte fallback, BOS) and byte-level BPE
//! (`gpt2`) with the pre-tokenizer named by `tokenizer.ggml.pre`.

use shears_core::formats::gguf::GgufFile;
use shears_core::Tokenizer;
use shears_tests::{spm_gguf, tiny_gguf_model, write_gguf, Meta};

#[test]
fn sentencepiece_bpe_with_byte_fallback_and_bos() {
    let tmp = tempfile::tempdir().unwrap();
    let g = GgufFile::open(spm_gguf(tmp.path())).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let ids = tok.encode("hello world", true).unwrap();
    assert_eq!(ids, vec![1, id("\u{2581}hello"), id("\u{2581}world")]);
    // An unknown character falls back to its UTF-8 bytes.
    let ids = tok.encode("hello \u{2603}", true).unwrap();
    assert_eq!(
        ids,
        vec![
            1,
            id("\u{2581}hello"),
            id("\u{2581}"),
            id("<0xE2>"),
            id("<0x98>"),
            id("<0x83>")
        ]
    );
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello \u{2603}");
    // Special tokens in raw text are matched whole.
    let ids = tok.encode("hello</s>", false).unwrap();
    assert_eq!(ids, vec![id("\u{2581}hello"), 2]);
}

#[test]
fn byte_level_pre_tokenizer_follows_ggml_pre() {
    let tmp = tempfile::tempdir().unwrap();
    let build = |pre: &str| {
        let (mut meta, tensors) = tiny_gguf_model();
        for (k, v) in meta.iter_mut() {
            if *k == "tokenizer.ggml.tokens" {
                if let Meta::StrArray(t) = v {
                    t.extend(["12", "34", "123"].map(String::from));
                }
            }
            if *k == "tokenizer.ggml.token_type" {
                if let Meta::I32Array(t) = v {
                    t.extend([1, 1, 1]);
                }
            }
            if *k == "tokenizer.ggml.merges" {
                *v = Meta::StrArray(["3 4", "1 2", "12 3"].map(String::from).to_vec());
            }
        }
        meta.push(("tokenizer.ggml.pre", Meta::Str(pre.into())));
        let p = tmp.path().join(format!("{pre}.gguf"));
        write_gguf(&p, &meta, &tensors, None);
        Tokenizer::from_gguf(&GgufFile::open(p).unwrap()).unwrap()
    };
    let pieces = |tok: &Tokenizer, text: &str| -> Vec<String> {
        tok.encode(text, false)
            .unwrap()
            .iter()
            .map(|&i| tok.id_to_token(i).unwrap())
            .collect()
    };
    // GPT-2's split keeps the digit run whole, so the "3 4" merge crosses it.
    assert_eq!(pieces(&build("gpt2"), "12345"), ["12", "34", "5"]);
    // Llama-3's split cuts digit runs into groups of at most three.
    assert_eq!(pieces(&build("llama-bpe"), "12345"), ["123", "4", "5"]);
    // SmolLM2's splits every digit.
    assert_eq!(pieces(&build("smollm"), "12345"), ["1", "2", "3", "4", "5"]);
    // An unknown pre-tokenizer falls back to GPT-2's, with a warning.
    let tok = build("mystery");
    assert!(tok.warnings.iter().any(|w| w.contains("mystery")));
}

/// A long text of words, numbers, punctuation, newlines and non-ASCII letters.
fn long_text(bytes: usize) -> String {
    let words = [
        "hello",
        "world",
        "the",
        "theorem",
        "x=1;",
        "42",
        "naïve",
        "東京",
        "don't",
        "\n",
        "  ",
        "hello,",
        "tab\there",
        "<|endoftext|>",
        "wörld",
        "3.14159",
    ];
    let mut seed = 5u64;
    let mut s = String::new();
    while s.len() < bytes {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(words[(seed >> 33) as usize % words.len()]);
        s.push(' ');
    }
    s
}

/// Texts longer than a piece are tokenized piece by piece, cut at spaces between words; the ids
/// are exactly those of the whole text, for byte-level BPE (the tiny tokenizer and SmolLM2's)
/// and for SentencePiece-style BPE, whose normalizer prepends '▁' to every input.
#[test]
fn long_texts_tokenize_in_pieces_exactly_as_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (meta, tensors) = tiny_gguf_model();
    let tiny = tmp.path().join("tiny.gguf");
    write_gguf(&tiny, &meta, &tensors, None);
    let toks = [
        (
            "tiny",
            Tokenizer::from_gguf(&GgufFile::open(&tiny).unwrap()).unwrap(),
        ),
        (
            "spm",
            Tokenizer::from_gguf(&GgufFile::open(spm_gguf(tmp.path())).unwrap()).unwrap(),
        ),
        (
            "smollm2",
            Tokenizer::from_gguf(&GgufFile::open(shears_tests::smollm2_gguf()).unwrap()).unwrap(),
        ),
    ];
    let text = long_text(5 * shears_core::tokenizer::PIECE_BYTES + 1234);
    let cyrillic = "слово мир 42 Ёж, ".repeat(shears_core::tokenizer::PIECE_BYTES / 5);
    let short = "hello world";
    for (name, tok) in &toks {
        let enc = tok.plain_text_encoder();
        let mut whole_tok = tok.inner().clone();
        whole_tok.set_encode_special_tokens(true);
        let whole = whole_tok.encode_fast(cyrillic.as_str(), false).unwrap();
        let got = enc.encode_batch(&[&cyrillic]).unwrap();
        assert_eq!(
            got[0],
            whole.get_ids(),
            "{name}: Cyrillic pieces differ from the whole"
        );
    }
    for (name, tok) in &toks {
        let enc = tok.plain_text_encoder();
        let mut whole_tok = tok.inner().clone();
        whole_tok.set_encode_special_tokens(true);
        let whole = whole_tok.encode_fast(text.as_str(), false).unwrap();
        let got = enc.encode_batch(&[short, &text, short]).unwrap();
        assert_eq!(
            got[1],
            whole.get_ids(),
            "{name}: pieces differ from the whole"
        );
        assert_eq!(got[0], got[2]);
        assert_eq!(got[0], tok.encode(short, false).unwrap(), "{name}");
    }
    // A long text without any place to cut is refused, not tokenized in one huge piece.
    let (_, tiny_tok) = &toks[0];
    let unbroken = "x".repeat(shears_core::tokenizer::WHOLE_BYTES + 1000);
    let err = tiny_tok
        .plain_text_encoder()
        .encode_batch(&[&unbroken])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no place to split"), "{err}");
}

/// A tokenizer.json saved with truncation and padding would cut and pad every document: both are
/// switched off, with a warning.
#[test]
fn truncation_and_padding_in_tokenizer_json_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let (meta, tensors) = tiny_gguf_model();
    let p = tmp.path().join("tiny.gguf");
    write_gguf(&p, &meta, &tensors, None);
    let tok = Tokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(tok.json()).unwrap();
    doc["truncation"] = serde_json::json!({"direction": "Right", "max_length": 4,
        "strategy": "LongestFirst", "stride": 0});
    doc["padding"] = serde_json::json!({"strategy": {"Fixed": 64}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"});
    let t = Tokenizer::from_json(
        doc.to_string(),
        Default::default(),
        &tmp.path().join("t.json"),
    )
    .unwrap();
    assert_eq!(t.warnings.len(), 2, "{:?}", t.warnings);
    let text = "the theorem then the cat";
    let want = tok.encode(text, false).unwrap();
    assert!(want.len() > 4);
    assert_eq!(t.encode(text, false).unwrap(), want);
    assert_eq!(
        t.plain_text_encoder().encode_batch(&[text, "the"]).unwrap()[0],
        want
    );
}
