//! `shears demo --quick` on the real SmolLM2-135M and the demo corpus: every stage runs, the
//! summary has the promised shape, and a demo killed with SIGKILL and resumed with `--resume`
//! writes the same `summary.json` as an uninterrupted one.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_shears");

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn train_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("train/metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"kind\":\"step\""))
        .count()
}

#[test]
fn quick_demo_runs_and_is_deterministic_across_kill_and_resume() {
    shears_tests::smollm2_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let o = Command::new(BIN)
        .args(["demo", "--quick", "--out"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("pruned + trained") && table.contains("exported model"),
        "{table}"
    );
    let s = read(&a.join("summary.json"));
    assert_eq!(s["source"]["params"], 134_515_008u64);
    let cfg = &s["pruned"]["config"];
    assert_eq!(cfg["num_hidden_layers"], 20);
    assert_eq!(cfg["hidden_size"], 384);
    assert_eq!(cfg["num_attention_heads"], 6);
    assert_eq!(cfg["num_key_value_heads"], 3);
    assert_eq!(cfg["intermediate_size"], 1024);
    assert!(s["pruned"]["params"].as_u64().unwrap() < 60_000_000);
    for m in ["source", "pruned", "trained"] {
        assert!(
            s[m]["per_domain_ppl"].as_object().unwrap().len() >= 4,
            "{m}"
        );
    }
    let export = Path::new(s["export_dir"].as_str().unwrap());
    assert!(export.join("model.safetensors").exists());
    // The source model is far better than the barely-trained pruned one.
    let (src, pr) = (
        &s["source"]["per_domain_ppl"],
        &s["pruned"]["per_domain_ppl"],
    );
    for (d, v) in src.as_object().unwrap() {
        assert!(v.as_f64().unwrap() < pr[d].as_f64().unwrap(), "{d}");
    }

    // Killed (SIGKILL) during continued pre-training, then resumed.
    let b = tmp.path().join("b");
    let mut child = Command::new(BIN)
        .args(["demo", "--quick", "--out"])
        .arg(&b)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while train_steps(&b) < 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the demo ended before it was killed"
        );
        assert!(start.elapsed() < Duration::from_secs(900));
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let o = Command::new(BIN)
        .args(["demo", "--quick", "--resume", "--out"])
        .arg(&b)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut sb = read(&b.join("summary.json"));
    assert_eq!(sb["export_dir"], b.join("export").display().to_string());
    sb["export_dir"] = s["export_dir"].clone();
    assert_eq!(sb, s);
}
