//! `prepare` with SmolLM2's tokenizer: documents round-trip through the shards, train and eval
//! are disjoint, a re-run is a no-op and a changed input is noticed, bad inputs give documented
//! errors or warnings, and a failed prepare leaves nothing behind.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use shears_core::{ModelFiles, Tokenizer};
use shears_data::prepare::{prepare, DataPlan, DomainPlan, Progress};
use shears_data::{Dataset, Split};
use shears_tests::smollm2_gguf;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| ModelFiles::load(smollm2_gguf()).unwrap().tokenizer.unwrap())
}

fn quiet(_: Progress) {}

fn plan(domains: &[(&str, Vec<String>)], seq_len: usize, eval: f64) -> DataPlan {
    DataPlan {
        tokenizer: "smollm2".into(),
        seq_len,
        eval_fraction: eval,
        seed: 7,
        shard_sequences: 5,
        bos: None,
        eos: None,
        domains: domains
            .iter()
            .map(|(n, i)| {
                (
                    n.to_string(),
                    DomainPlan {
                        inputs: i.clone(),
                        text_field: "text".into(),
                        extensions: vec![],
                    },
                )
            })
            .collect(),
    }
}

fn documents(n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| format!("{tag} document {i}: the quick brown fox number {i} jumps over {} lazy dogs.\nSecond line, with ünïcödé ✓ and <|endoftext|> as plain text.", i * 7))
        .collect()
}

fn write_jsonl(path: &Path, docs: &[String]) {
    let lines: Vec<String> = docs
        .iter()
        .map(|d| serde_json::json!({"text": d}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// All tokens of a split, in order.
fn stream(ds: &Dataset, domain: &str, split: Split) -> Vec<u32> {
    let s = ds.split(domain, split).unwrap();
    (0..s.len()).flat_map(|i| s.sequence(i).unwrap()).collect()
}

/// The documents of a token stream: complete `text + EOS` pieces, decoded, and the partial tail.
fn pieces(tok: &Tokenizer, tokens: &[u32], eos: u32) -> (Vec<String>, Vec<u32>) {
    let mut docs = vec![];
    let mut cur = vec![];
    for &t in tokens {
        if t == eos {
            docs.push(tok.decode(&cur, false).unwrap());
            cur.clear();
        } else {
            cur.push(t);
        }
    }
    (docs, cur)
}

#[test]
fn documents_round_trip_and_splits_are_disjoint() {
    let tok = tokenizer();
    let tmp = tempfile::tempdir().unwrap();
    let docs_a = documents(40, "alpha");
    let docs_b = documents(25, "beta");
    write_jsonl(&tmp.path().join("a.jsonl"), &docs_a);
    std::fs::create_dir(tmp.path().join("b")).unwrap();
    for (i, d) in docs_b.iter().enumerate() {
        std::fs::write(tmp.path().join(format!("b/{i:03}.txt")), d).unwrap();
    }
    let p = plan(
        &[
            (
                "alpha",
                vec![tmp.path().join("a.jsonl").display().to_string()],
            ),
            ("beta", vec![format!("{}/b/*.txt", tmp.path().display())]),
        ],
        32,
        0.25,
    );
    let out = tmp.path().join("data");
    let outcome = prepare(&p, tok, "smollm2", &out, false, &quiet).unwrap();
    assert!(!outcome.up_to_date);
    let ds = Dataset::open(&out).unwrap();
    let m = &ds.manifest;
    assert_eq!(m.tokenizer.bos_id, None, "SmolLM2 adds no BOS");
    assert_eq!(
        m.tokenizer.eos_id,
        tok.token_to_id("<|endoftext|>").unwrap()
    );
    for (name, docs) in [("alpha", &docs_a), ("beta", &docs_b)] {
        let d = &m.domains[name];
        assert_eq!(d.documents, docs.len());
        assert_eq!(d.train_documents + d.eval_documents, docs.len());
        assert!(d.eval_documents > 0 && d.train_documents > 0);
        assert_eq!(d.train_tokens, d.train_sequences * 32);
        let all: HashSet<&String> = docs.iter().collect();
        let mut seen = HashSet::new();
        for split in [Split::Train, Split::Eval] {
            let tokens = stream(&ds, name, split);
            let (complete, tail) = pieces(tok, &tokens, m.tokenizer.eos_id);
            for text in &complete {
                assert!(
                    all.contains(text),
                    "{name}: decoded piece is not an input document: {text:?}"
                );
                assert!(
                    seen.insert(text.clone()),
                    "{name}: document in two places: {text:?}"
                );
            }
            // The dropped remainder is the rest of one document.
            let dropped = if split == Split::Train {
                d.dropped_train_tokens
            } else {
                d.dropped_eval_tokens
            };
            assert!(dropped < 32);
            let tail_text = tok.decode(&tail, false).unwrap();
            assert!(
                tail.is_empty() || docs.iter().any(|doc| doc.starts_with(&tail_text)),
                "tail {tail_text:?}"
            );
        }
        // Only the documents cut by the two dropped remainders can be missing.
        assert!(
            seen.len() + 2 >= docs.len(),
            "{name}: {} of {} documents round-trip",
            seen.len(),
            docs.len()
        );
        // Literal special-token strings in a text stay text.
        assert!(seen
            .iter()
            .all(|t| t.contains("<|endoftext|> as plain text")));
    }
    // Shards are split at shard_sequences and hashed.
    assert!(m.domains["alpha"].train_shards.len() > 1);
    assert!(m.domains["alpha"]
        .train_shards
        .iter()
        .all(|s| s.sequences <= 5 && s.sha256.len() == 64));
    // Per-domain eval batches run in a fixed order.
    let a: Vec<_> = ds
        .eval_batches("alpha", 2)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let b: Vec<_> = ds
        .eval_batches("alpha", 2)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(a, b);
    assert_eq!(
        a.iter().map(|x| x.len()).sum::<usize>() as u64,
        m.domains["alpha"].eval_sequences
    );
}

#[test]
fn rerun_is_a_no_op_and_changes_are_detected() {
    let tok = tokenizer();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("a.jsonl");
    write_jsonl(&input, &documents(30, "x"));
    let p = plan(&[("x", vec![input.display().to_string()])], 16, 0.1);
    let out = tmp.path().join("data");
    let first = prepare(&p, tok, "smollm2", &out, false, &quiet).unwrap();
    let shard = out.join(&first.manifest.domains["x"].train_shards[0].file);
    let stamp = std::fs::metadata(&shard).unwrap().modified().unwrap();
    let again = prepare(&p, tok, "smollm2", &out, false, &quiet).unwrap();
    assert!(again.up_to_date);
    assert_eq!(again.manifest, first.manifest);
    assert_eq!(
        std::fs::metadata(&shard).unwrap().modified().unwrap(),
        stamp,
        "nothing rewritten"
    );
    // A changed input is noticed and the output rebuilt.
    write_jsonl(&input, &documents(45, "x"));
    let changed = prepare(&p, tok, "smollm2", &out, false, &quiet).unwrap();
    assert!(!changed.up_to_date);
    assert_eq!(changed.manifest.domains["x"].documents, 45);
    assert_ne!(changed.manifest.fingerprint, first.manifest.fingerprint);
    // So is a changed setting.
    let mut p2 = p.clone();
    p2.seq_len = 24;
    assert!(
        !prepare(&p2, tok, "smollm2", &out, false, &quiet)
            .unwrap()
            .up_to_date
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "no staging directories left"
    );
}

#[test]
fn bad_inputs_are_documented_errors_or_warnings() {
    let tok = tokenizer();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let good = d.join("good.jsonl");
    write_jsonl(&good, &documents(20, "g"));
    let mut lines = std::fs::read_to_string(&good).unwrap();
    lines.push_str("not json\n{\"body\": \"no text field\"}\n");
    let noisy = d.join("noisy.jsonl");
    std::fs::write(&noisy, lines).unwrap();
    let out = d.join("out");
    // Bad lines are warnings naming file:line, the rest is prepared.
    let o = prepare(
        &plan(&[("n", vec![noisy.display().to_string()])], 16, 0.1),
        tok,
        "smollm2",
        &out,
        false,
        &quiet,
    )
    .unwrap();
    assert_eq!(o.warnings.len(), 2);
    assert!(
        o.warnings[0].contains("noisy.jsonl:21: not JSON"),
        "{:?}",
        o.warnings
    );
    assert!(o.warnings[1].contains("noisy.jsonl:22: no field 'text'"));
    assert_eq!(o.manifest.domains["n"].skipped_lines, 2);

    let fail = |domains: &[(&str, Vec<String>)]| -> String {
        let out = d.join("failed");
        let e = prepare(&plan(domains, 16, 0.1), tok, "smollm2", &out, false, &quiet)
            .unwrap_err()
            .to_string();
        assert!(!out.exists(), "a failed prepare leaves no output");
        let partial: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(partial.is_empty(), "no half-written directory");
        e
    };
    let bad_utf8 = d.join("bad.txt");
    std::fs::write(&bad_utf8, [b'a', 0xff, b'b']).unwrap();
    // The first domain is fine; the second fails half-way through the run.
    let e = fail(&[
        ("a", vec![good.display().to_string()]),
        ("b", vec![bad_utf8.display().to_string()]),
    ]);
    assert!(
        e.contains("bad.txt") && e.contains("not valid UTF-8 (at byte 1)"),
        "{e}"
    );
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "\n{\"text\": \"\"}\nnope\n").unwrap();
    let e = fail(&[("empty", vec![empty.display().to_string()])]);
    assert!(e.contains("domain 'empty' has no documents"), "{e}");
    let e = fail(&[("m", vec![d.join("missing.jsonl").display().to_string()])]);
    assert!(
        e.contains("missing.jsonl") && e.contains("does not exist"),
        "{e}"
    );
    let mut bad_name = plan(&[("ok", vec![good.display().to_string()])], 16, 0.1);
    bad_name.domains = BTreeMap::from([("../evil".to_string(), bad_name.domains["ok"].clone())]);
    assert!(bad_name.validate().unwrap_err().contains("domain name"));
}

/// A word-level tokenizer whose vocabulary has four tokens but an id above 2^16 (a sparse id
/// table, as merged or extended vocabularies have): the shards must be u32, never a truncated
/// u16 (100788 stored as 35252).
#[test]
fn ids_above_the_token_count_widen_the_shards() {
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
        "decoder":null,"model":{"type":"WordLevel","unk_token":"[UNK]",
        "vocab":{"[UNK]":0,"hello":1,"</s>":2,"zebra":100788}}}"#;
    let tok = Tokenizer::from_json(
        json.to_string(),
        Default::default(),
        Path::new("sparse/tokenizer.json"),
    )
    .unwrap();
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(tok.max_id(), 100788);
    let tmp = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..30)
        .map(|i| "hello zebra ".repeat(3 + i % 4).trim().to_string())
        .collect();
    let input = tmp.path().join("z.jsonl");
    write_jsonl(&input, &docs);
    let mut p = plan(&[("z", vec![input.display().to_string()])], 8, 0.2);
    p.bos = Some("none".into());
    p.eos = Some("</s>".into());
    let out = tmp.path().join("data");
    prepare(&p, &tok, "sparse", &out, false, &quiet).unwrap();
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.manifest.dtype, shears_data::manifest::TokenDType::U32);
    assert_eq!(ds.manifest.tokenizer.vocab_size, 100789);
    for split in [Split::Train, Split::Eval] {
        let tokens = stream(&ds, "z", split);
        assert!(tokens.contains(&100788), "{split:?}: the large id survives");
        assert!(
            tokens.iter().all(|t| [1, 2, 100788].contains(t)),
            "{split:?}: only ids the tokenizer produced: {tokens:?}"
        );
    }
}

/// A prepare that would write an empty train split, or no eval sequence in any domain although
/// eval was asked for, is an error naming the domain and what to change, and leaves nothing
/// behind.
#[test]
fn empty_splits_are_errors() {
    let tok = tokenizer();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let short = d.join("short.jsonl");
    write_jsonl(
        &short,
        &["a few words".to_string(), "and a few more".to_string()],
    );
    let good = d.join("good.jsonl");
    write_jsonl(&good, &documents(20, "g"));
    let out = d.join("out");
    // seq_len longer than every document of a domain: no train sequence.
    let e = prepare(
        &plan(
            &[
                ("good", vec![good.display().to_string()]),
                ("short", vec![short.display().to_string()]),
            ],
            512,
            0.0,
        ),
        tok,
        "smollm2",
        &out,
        false,
        &quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("domain 'short'") && e.contains("no sequence of seq_len 512"),
        "{e}"
    );
    assert!(!out.exists(), "a failed prepare leaves no output");
    // One short and one long document: whichever the seeded order puts in the eval split, one
    // split holds no sequence (the long one alone suffices for either), and that split is named.
    let pair = d.join("pair.jsonl");
    write_jsonl(
        &pair,
        &["a few words".to_string(), documents(20, "long").join(" ")],
    );
    let mut kinds = HashSet::new();
    for seed in 0..16 {
        let mut p = plan(&[("pair", vec![pair.display().to_string()])], 256, 0.1);
        p.seed = seed;
        let e = prepare(&p, tok, "smollm2", &out, false, &quiet)
            .unwrap_err()
            .to_string();
        assert!(e.contains("domain 'pair'"), "{e}");
        if e.contains("no domain's eval split") {
            assert!(e.contains("eval_fraction = 0"), "{e}");
            kinds.insert("eval");
        } else {
            assert!(
                e.contains("train tokens") && e.contains("lower seq_len"),
                "{e}"
            );
            kinds.insert("train");
        }
        assert!(!out.exists());
    }
    assert_eq!(kinds.len(), 2, "both orders were seen: {kinds:?}");
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !["short.jsonl", "good.jsonl", "pair.jsonl"].contains(&n.as_str()))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
