//! Every family through the whole pipeline, as a user runs it: `shears run` prunes (all five mask
//! types, two data-parallel ranks, layer checkpointing), finalizes, trains with the source as
//! KD teacher in bf16-mixed, evaluates and exports the tiny model of each family
//! (`tests/fixtures/families`); then `info`, zero-shot `eval` and a GGUF export of the result,
//! which reads back as the same family and scores as the HF export does.

use std::path::Path;

use serde_json::Value;
use shears_tests::families;
use shears_tests::runs::{corpus, ok, shears, TINY_TARGET};

const BIN: &str = env!("CARGO_BIN_EXE_shears");

fn plan(dir: &Path, model: &Path, out: &Path) -> String {
    let mut domains = String::new();
    for (name, p) in corpus(dir) {
        domains.push_str(&format!(
            "[data.domains.{name}]\ninputs = [\"{}\"]\n",
            p.display()
        ));
    }
    format!(
        r#"model = "{model}"
out = "{out}"
{TINY_TARGET}
[data]
tokenizer = "{model}"
seq_len = 32
eval_fraction = 0.15
seed = 2
{domains}
[prune.run]
steps = 6
batch_size = 2
micro_batch = 1
devices = 2
checkpointing = "layers"
eval_interval = 3
eval_sequences = 2
[train.run]
steps = 6
batch_size = 2
eval_interval = 3
eval_sequences = 2
precision = "bf16-mixed"
[train.optim]
lr = 0.003
[train.distill]
teacher = "source"
[eval]
sequences = 3
batch = 2
"#,
        model = model.display(),
        out = out.display()
    )
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn mean_nll(model: &Path) -> f64 {
    let o = shears(
        BIN,
        &[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--text",
            "the cat sat on the mat and then they thought",
            "--json",
        ],
    );
    ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["mean_nll"].as_f64().unwrap()
}

fn pipeline(family: &str, arch: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("source");
    families::model(family)
        .write_hf_dir(&source, None, false)
        .unwrap();
    let out = tmp.path().join("run");
    let p = tmp.path().join("pipeline.toml");
    std::fs::write(&p, plan(tmp.path(), &source, &out)).unwrap();
    ok(&shears(
        BIN,
        &["--threads", "2", "run", p.to_str().unwrap()],
    ));
    let s = read(&out.join("summary.json"));
    assert!(s["pruned"]["params"].as_u64() < s["source"]["params"].as_u64());
    assert_eq!(s["pruned"]["config"]["hidden_size"], 16, "{family}");
    // Training (with its teacher) lowered the pruned model's loss on every domain.
    for (d, v) in s["trained"]["per_domain_ppl"].as_object().unwrap() {
        let before = s["pruned"]["per_domain_ppl"][d].as_f64().unwrap();
        assert!(v.as_f64().unwrap() < before, "{family} {d}");
    }
    let metrics = std::fs::read_to_string(out.join("train/metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("\"kd_loss\""),
        "{family}: the KD term is logged"
    );
    let export = Path::new(s["export_dir"].as_str().unwrap());
    let cfg = read(&export.join("config.json"));
    assert_eq!(cfg["architectures"][0], arch, "{family}");
    let src = read(&source.join("config.json"));
    for key in ["model_type", "sliding_window", "query_pre_attn_scalar"] {
        assert_eq!(cfg[key], src[key], "{family}: {key}");
    }
    let head_dim = families::model(family).config.head_dim();
    assert_eq!(cfg["head_dim"], head_dim, "{family}");

    let o = shears(BIN, &["info", export.to_str().unwrap()]);
    ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(arch),
        "{family}"
    );
    let o = shears(
        BIN,
        &[
            "eval",
            "--model",
            export.to_str().unwrap(),
            "--tasks",
            "arc_easy,lambada",
            "--limit",
            "3",
            "--json",
        ],
    );
    ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tasks"]["arc_easy"]["n"], 3, "{family}");

    let gguf = tmp.path().join("m.gguf");
    ok(&shears(
        BIN,
        &[
            "export",
            export.to_str().unwrap(),
            "--format",
            "gguf",
            "--quant",
            "f32",
            "--out",
            gguf.to_str().unwrap(),
        ],
    ));
    let (a, b) = (mean_nll(export), mean_nll(&gguf));
    assert!((a - b).abs() < 1e-4, "{family}: HF {a} vs GGUF {b}");
    // For scripts/check_transformers.py and check_llama_cpp.py to load the exports.
    if let Some(keep) = std::env::var_os("SHEARS_FAMILY_EXPORTS") {
        let dir = Path::new(&keep).join(family);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(export).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        std::fs::copy(&gguf, Path::new(&keep).join(format!("{family}.gguf"))).unwrap();
    }
}

#[test]
fn qwen2_runs_the_pipeline() {
    pipeline("qwen2", "Qwen2ForCausalLM");
}

#[test]
fn qwen3_with_a_window_runs_the_pipeline() {
    pipeline("qwen3-window", "Qwen3ForCausalLM");
}

#[test]
fn gemma3_runs_the_pipeline() {
    pipeline("gemma3", "Gemma3ForCausalLM");
}

#[test]
fn mistral_with_a_window_runs_the_pipeline() {
    pipeline("mistral-window", "MistralForCausalLM");
}
