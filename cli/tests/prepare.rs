//! `shears prepare` in its flags form: the manifest fields, and clean failures.

use std::process::Command;

#[test]
fn flags_form_writes_the_manifest() {
    shears_tests::smollm2_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.jsonl");
    let lines: Vec<String> = (0..50)
        .map(|i| {
            serde_json::json!({"body": format!("Document {i} talks about topic {}.", i % 7)})
                .to_string()
        })
        .collect();
    std::fs::write(&a, lines.join("\n")).unwrap();
    let b = tmp.path().join("b.txt");
    std::fs::write(&b, "A single plain text document, long enough to fill a few sequences of sixteen tokens each. ".repeat(8)).unwrap();
    let out = tmp.path().join("data");
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(["prepare", "--tokenizer", "smollm2", "--domain"])
        .arg(format!("web={}", a.display()))
        .arg("--domain")
        .arg(format!("book={}", b.display()))
        .args([
            "--seq-len",
            "16",
            "--eval-fraction",
            "0.2",
            "--seed",
            "3",
            "--text-field",
            "body",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["seq_len"], 16);
    assert_eq!(m["dtype"], "u16");
    assert_eq!(m["seed"], 3);
    assert_eq!(m["tokenizer"]["sha256"].as_str().unwrap().len(), 64);
    for d in ["web", "book"] {
        for key in [
            "documents",
            "train_tokens",
            "eval_tokens",
            "train_sequences",
            "eval_sequences",
        ] {
            assert!(m["domains"][d][key].is_u64(), "{d}.{key}");
        }
        assert_eq!(
            m["domains"][d]["sources"][0]["sha256"]
                .as_str()
                .unwrap()
                .len(),
            64
        );
    }
    assert_eq!(m["domains"]["web"]["documents"], 50);
    assert!(m["split_rule"].as_str().unwrap().contains("by document"));
    assert!(m["packing"].as_str().unwrap().contains("dropped"));
    // The same command again does nothing.
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(["prepare", "--tokenizer", "smollm2", "--domain"])
        .arg(format!("web={}", a.display()))
        .arg("--domain")
        .arg(format!("book={}", b.display()))
        .args([
            "--seq-len",
            "16",
            "--eval-fraction",
            "0.2",
            "--seed",
            "3",
            "--text-field",
            "body",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("is up to date"));
}

#[test]
fn bad_input_fails_cleanly() {
    shears_tests::smollm2_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, [0xffu8, 0xfe]).unwrap();
    let out = tmp.path().join("data");
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(["prepare", "--tokenizer", "smollm2", "--domain"])
        .arg(format!("x={}", bad.display()))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        !err.contains("panicked") && err.contains("bad.txt") && err.contains("not valid UTF-8"),
        "{err}"
    );
    assert!(!out.exists());
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args([
            "prepare",
            "--tokenizer",
            "smollm2",
            "--domain",
            "nopath",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("NAME=PATH"));
}
