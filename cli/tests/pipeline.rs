//! `shears run` end to end on the tiny model: prepare → prune → finalize → train → eval →
//! export, resumable stage by stage, with the same summary when resumed.

use std::path::Path;

use serde_json::Value;
use shears_tests::runs::{pipeline_head, shears};

const BIN: &str = env!("CARGO_BIN_EXE_shears");

fn plan(dir: &Path, out: &Path) -> String {
    format!(
        r#"{}
[prune.run]
steps = 12
batch_size = 2
eval_interval = 4
eval_sequences = 2
[train.run]
steps = 10
batch_size = 2
eval_interval = 5
eval_sequences = 2
[train.optim]
lr = 0.003
[eval]
sequences = 3
batch = 2
"#,
        pipeline_head(dir, out)
    )
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn run_pipeline_end_to_end_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pipe");
    let p = tmp.path().join("pipeline.toml");
    std::fs::write(&p, plan(tmp.path(), &out)).unwrap();
    let o = shears(BIN, &["run", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("pruned + trained"), "{table}");
    let s = read(&out.join("summary.json"));
    for m in ["source", "pruned", "trained"] {
        let ppl = s[m]["per_domain_ppl"].as_object().unwrap();
        assert_eq!(ppl.len(), 3, "{m}");
        assert!(
            ppl.values().all(|v| v.as_f64().unwrap() > 1.0),
            "{m}: {ppl:?}"
        );
    }
    assert!(s["pruned"]["params"].as_u64() < s["source"]["params"].as_u64());
    assert_eq!(s["pruned"]["params"], s["trained"]["params"]);
    assert_eq!(s["pruned"]["config"]["num_hidden_layers"], 1);
    assert_eq!(s["pruned"]["config"]["hidden_size"], 16);
    assert_eq!(s["pruned"]["config"]["intermediate_size"], 32);
    // Training lowered the pruned model's loss on every domain.
    for (d, v) in s["trained"]["per_domain_ppl"].as_object().unwrap() {
        assert!(
            v.as_f64().unwrap() < s["pruned"]["per_domain_ppl"][d].as_f64().unwrap(),
            "{d}"
        );
    }
    let export = Path::new(s["export_dir"].as_str().unwrap());
    assert!(export.join("config.json").exists());
    assert!(out.join("pruned").join("masks.safetensors").exists());
    // The continued pre-training started from the pruning run's final domain weights.
    let prune_end: Value = read(&out.join("prune/checkpoints/step-00000012/state.json"));
    let train_first = std::fs::read_to_string(out.join("train/metrics.jsonl")).unwrap();
    let first_eval: Value = train_first
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["kind"] == "eval")
        .unwrap();
    assert_eq!(
        first_eval["weights_before"],
        prune_end["sampler"]["weights"]
    );
    assert_eq!(first_eval["reference_loss"], prune_end["reference_losses"]);
    // The exported model scores text.
    let o = shears(
        BIN,
        &[
            "score",
            "--model",
            export.to_str().unwrap(),
            "--text",
            "the cat sat on the mat",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Again without --resume: refused. With --resume: nothing to redo, same summary.
    let o = shears(BIN, &["run", p.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let o = shears(BIN, &["run", p.to_str().unwrap(), "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read(&out.join("summary.json")), s);

    // A fresh run of the same plan gives the same summary (deterministic on the CPU).
    let out2 = tmp.path().join("pipe2");
    let p2 = tmp.path().join("pipeline2.toml");
    std::fs::write(&p2, plan(tmp.path(), &out2)).unwrap();
    let o = shears(BIN, &["run", p2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut s2 = read(&out2.join("summary.json"));
    s2["export_dir"] = s["export_dir"].clone();
    assert_eq!(s2, s);
}
