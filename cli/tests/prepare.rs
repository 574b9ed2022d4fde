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

/// A code and documentation tree as it is on disk: a glob takes `.rs` files, a directory takes
/// the extensions `--ext` (or the plan's `extensions`) lists, binaries are skipped and counted,
/// and the manifest counts files per extension.
#[test]
fn code_trees_prepare_by_glob_and_extension() {
    shears_tests::smollm2_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("src/ops")).unwrap();
    std::fs::create_dir_all(repo.join("docs")).unwrap();
    for i in 0..6 {
        let code =
            format!("/// Function {i}.\npub fn f{i}(x: u32) -> u32 {{\n    x * {i} + 1\n}}\n")
                .repeat(4);
        std::fs::write(repo.join(format!("src/ops/m{i}.rs")), code).unwrap();
        let doc =
            format!("# Page {i}\n\nThis page explains part {i} of the tool in a few words.\n")
                .repeat(4);
        std::fs::write(repo.join(format!("docs/p{i}.md")), doc).unwrap();
    }
    std::fs::write(repo.join("docs/setup.py"), "print('set up')\n".repeat(8)).unwrap();
    std::fs::write(
        repo.join("src/ops/blob.rs"),
        [0x7f, b'E', b'L', b'F', 0, 0, 1],
    )
    .unwrap();
    std::fs::write(repo.join("docs/logo.png"), [0x89, b'P', b'N', b'G', 0]).unwrap();
    let prepare = |extra: &[&str], out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_shears"))
            .args([
                "prepare",
                "--tokenizer",
                "smollm2",
                "--seq-len",
                "16",
                "--eval-fraction",
                "0.2",
            ])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let github = format!("github={}/src/**/*.rs", repo.display());
    let docs = format!("docs={}", repo.join("docs").display());

    // Without --ext the docs directory holds nothing Shears takes: a clean error with the hint.
    let out = tmp.path().join("none");
    let o = prepare(&["--domain", &github, "--domain", &docs], &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("docs") && err.contains("--ext rs,py,md") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists());

    let out = tmp.path().join("data");
    let o = prepare(
        &["--domain", &github, "--domain", &docs, "--ext", "md,.PY"],
        &out,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("skipped 1 files that are not text") && err.contains("blob.rs"),
        "{err}"
    );
    assert!(
        err.contains("github: files 7 rs (1 not text, skipped)"),
        "{err}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let g = &m["domains"]["github"];
    assert_eq!(g["documents"], 6);
    assert_eq!(g["skipped_binary_files"], 1);
    assert_eq!(g["extensions"]["rs"]["files"], 7);
    assert_eq!(g["extensions"]["rs"]["documents"], 6);
    assert_eq!(g["extensions"]["rs"]["binary"], 1);
    let d = &m["domains"]["docs"];
    assert_eq!(d["documents"], 7);
    assert_eq!(d["extensions"]["md"]["files"], 6);
    assert_eq!(d["extensions"]["py"]["files"], 1);
    assert!(d["extensions"].get("png").is_none(), "{d}");
    assert_eq!(d["skipped_binary_files"], 0);

    // The same from a plan's `extensions`; the dataset is then up to date.
    let plan = tmp.path().join("data.toml");
    std::fs::write(
        &plan,
        format!(
            "tokenizer = \"smollm2\"\nseq_len = 16\neval_fraction = 0.2\n[domains.github]\ninputs = [\"{}/src/**/*.rs\"]\n[domains.docs]\ninputs = [\"{}\"]\nextensions = [\"md\", \"py\"]\n",
            repo.display(),
            repo.join("docs").display()
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(["prepare", "--plan"])
        .arg(&plan)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("up to date"), "{err}");
    // A bad extension in a plan is refused naming the domain.
    std::fs::write(
        &plan,
        std::fs::read_to_string(&plan)
            .unwrap()
            .replace("\"py\"", "\"src/*.py\""),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(["prepare", "--plan"])
        .arg(&plan)
        .arg("--out")
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("domain 'docs'") && err.contains("src/*.py"),
        "{err}"
    );
}
