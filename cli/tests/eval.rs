//! `shears eval` on the tiny model: per-domain perplexity, a pruning checkpoint with its masks
//! equals the finalized model, and clear errors.

use serde_json::Value;
use shears_tests::runs::{setup, shears, TINY_TARGET};

const BIN: &str = env!("CARGO_BIN_EXE_shears");

fn json(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn per_domain_perplexity_and_masked_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let v = json(&shears(
        BIN,
        &["eval", "--model", m, "--data", d, "--json", "--batch", "3"],
    ));
    let domains = v["domains"].as_object().unwrap();
    assert_eq!(domains.len(), 3);
    for (name, r) in domains {
        let (loss, ppl) = (
            r["loss"].as_f64().unwrap(),
            r["perplexity"].as_f64().unwrap(),
        );
        assert!((ppl - loss.exp()).abs() < 1e-9 * ppl, "{name}");
        // An untrained model over 262 tokens: close to uniform.
        assert!((loss - 262f64.ln()).abs() < 0.2, "{name}: {loss}");
        assert!(r["tokens"].as_u64().unwrap() > 0);
    }
    // The batch size does not change the numbers.
    let w = json(&shears(
        BIN,
        &["eval", "--model", m, "--data", d, "--json", "--batch", "1"],
    ));
    for (name, r) in domains {
        assert!(
            (r["loss"].as_f64().unwrap() - w["domains"][name]["loss"].as_f64().unwrap()).abs()
                < 1e-6
        );
    }

    // A pruning run evaluated with its deterministic masks equals the finalized model.
    let plan = tmp.path().join("p.toml");
    std::fs::write(
        &plan,
        format!("model = \"{m}\"\ndata = \"{d}\"\n{TINY_TARGET}\n[run]\nsteps = 6\nbatch_size = 2\neval_sequences = 1\n"),
    )
    .unwrap();
    let run = tmp.path().join("run");
    let o = shears(
        BIN,
        &[
            "prune",
            "--config",
            plan.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("pruned");
    let o = shears(
        BIN,
        &[
            "finalize",
            "--run",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let masked = json(&shears(
        BIN,
        &[
            "eval",
            "--run",
            run.to_str().unwrap(),
            "--masked",
            "--data",
            d,
            "--json",
        ],
    ));
    let dense = json(&shears(
        BIN,
        &[
            "eval",
            "--model",
            out.to_str().unwrap(),
            "--data",
            d,
            "--json",
        ],
    ));
    for (name, r) in dense["domains"].as_object().unwrap() {
        let (a, b) = (
            r["loss"].as_f64().unwrap(),
            masked["domains"][name]["loss"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-4, "{name}: finalized {a} vs masked {b}");
    }
    assert!(masked["model"].as_str().unwrap().contains("masked"));
}

#[test]
fn bad_eval_arguments_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = shears_tests::runs::tiny_model(tmp.path());
    let m = model.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["eval", "--model", m, "--tasks", "nope"],
            "unknown task 'nope'",
        ),
        (
            &[
                "eval",
                "--model",
                m,
                "--tasks",
                "piqa",
                "--tasks-dir",
                "/nonexistent/oe",
            ],
            "/nonexistent/oe",
        ),
        (&["eval", "--model", m], "--tasks"),
        (
            &["eval", "--model", m, "--data", "/nonexistent/data"],
            "/nonexistent/data",
        ),
    ];
    for (args, want) in cases {
        let o = shears(BIN, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `--output-path` writes lm-evaluation-harness-shaped `results.json` and, with
/// `--log-samples`, one JSONL record per document; `--limit` below 1 is a fraction.
#[test]
fn lm_eval_shaped_results_with_a_fractional_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = shears_tests::runs::tiny_model(tmp.path());
    let out = tmp.path().join("results");
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--tasks",
            // Named twice, run and counted once.
            "arc_easy,lambada,arc_easy",
            "--limit",
            "0.002",
            "--output-path",
            out.to_str().unwrap(),
            "--log-samples",
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    let a = args(&out);
    let v = json(&shears(
        BIN,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for task in ["arc_easy", "lambada"] {
        let n = &r["n-samples"][task];
        let (orig, eff) = (
            n["original"].as_u64().unwrap(),
            n["effective"].as_u64().unwrap(),
        );
        assert_eq!(eff, (orig as f64 * 0.002).ceil() as u64, "{task}");
        assert_eq!(eff, v["tasks"][task]["n"].as_u64().unwrap());
        assert_eq!(
            r["results"][task]["acc,none"], v["tasks"][task]["acc"],
            "{task}"
        );
        assert_eq!(r["n-shot"][task], 0);
        let lines = std::fs::read_to_string(out.join(format!("samples_{task}.jsonl"))).unwrap();
        let docs: Vec<Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(docs.len() as u64, eff, "{task}");
        let mean = docs.iter().map(|d| d["acc"].as_f64().unwrap()).sum::<f64>() / docs.len() as f64;
        assert!(
            (mean - v["tasks"][task]["acc"].as_f64().unwrap()).abs() < 1e-12,
            "{task}"
        );
    }
    assert_eq!(r["configs"]["arc_easy"]["output_type"], "multiple_choice");
    assert_eq!(r["configs"]["lambada"]["output_type"], "loglikelihood");
    assert_eq!(r["higher_is_better"]["lambada"]["perplexity"], false);
    assert_eq!(r["config"]["limit"], 0.002);
    assert_eq!(v["tasks"].as_object().unwrap().len(), 2);
    // A file as --output-path, and a bad limit, are refused before any work.
    let file = tmp.path().join("f");
    std::fs::write(&file, "x").unwrap();
    for (args, want) in [
        (args(&file), "is not a directory"),
        (args(&out).into_iter().map(|x| if x == "0.002" { "1.5".into() } else { x }).collect(), "--limit '1.5'"),
        // PIQA's first solution is 160 byte tokens, more than the tiny model's context (128).
        (
            args(&tmp.path().join("piqa")).into_iter().map(|x| if x == "arc_easy,lambada,arc_easy" { "piqa".into() } else { x }).collect(),
            "task piqa: document 0 choice 0: the continuation is 160 tokens, longer than the model's context of 128",
        ),
    ] {
        let o = shears(BIN, &args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{err}");
    }
    assert!(
        !tmp.path().join("piqa").exists(),
        "a failed run leaves no results"
    );
}

/// MMLU through the CLI: one question per subject (`--limit 1` applies to each), the group
/// and its 57 subjects in `results.json`, the macro average; a missing or damaged MMLU
/// directory is a clear error that leaves no results behind.
#[test]
fn mmlu_groups_and_damaged_data() {
    let tmp = tempfile::tempdir().unwrap();
    let model = shears_tests::runs::tiny_model(tmp.path());
    let m = model.to_str().unwrap();
    let out = tmp.path().join("results");
    let v = json(&shears(
        BIN,
        &[
            "eval",
            "--model",
            m,
            "--tasks",
            "mmlu_mc_val",
            "--limit",
            "1",
            "--output-path",
            out.to_str().unwrap(),
            "--json",
        ],
    ));
    let t = &v["tasks"]["mmlu_mc_val"];
    assert_eq!(t["n"], 57);
    assert_eq!(t["requests"], 57 * 4);
    assert_eq!(t["documents_total"], 1531);
    let subs = t["subtasks"].as_object().unwrap();
    assert_eq!(subs.len(), 57);
    let macro_acc = subs
        .values()
        .map(|s| s["acc"].as_f64().unwrap())
        .sum::<f64>()
        / 57.0;
    assert!((t["primary"].as_f64().unwrap() - macro_acc).abs() < 1e-12);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let group = r["group_subtasks"]["mmlu_mc_val"].as_array().unwrap();
    assert_eq!(group.len(), 57);
    assert!(group.contains(&Value::from("mmlu_mc_val_virology")));
    assert_eq!(r["results"]["mmlu_mc_val"]["acc_macro,none"], t["primary"]);
    assert_eq!(r["results"]["mmlu_mc_val"]["acc,none"], t["acc"]);
    let one = r["results"]["mmlu_mc_val_anatomy"]["acc,none"]
        .as_f64()
        .unwrap();
    assert!(one == 0.0 || one == 1.0);
    assert_eq!(r["n-shot"]["mmlu_mc_val"], 5);
    assert_eq!(r["n-shot"]["mmlu_mc_val_anatomy"], 5);

    // A directory that is not MMLU, and one whose Arrow file is cut short.
    let src = shears_eval::mmlu::data_dir(|_| {}).unwrap();
    let bad = tmp.path().join("mmlu");
    for s in shears_eval::mmlu::SUBJECTS {
        for split in ["dev", "validation", "test"] {
            let d = bad.join(s).join(split);
            std::fs::create_dir_all(&d).unwrap();
            let f = "data-00000-of-00001.arrow";
            let bytes = std::fs::read(src.join(s).join(split).join(f)).unwrap();
            let keep = if s == "astronomy" && split == "validation" {
                bytes.len() / 2
            } else {
                bytes.len()
            };
            std::fs::write(d.join(f), &bytes[..keep]).unwrap();
        }
    }
    for (dir, want) in [
        (
            "/nonexistent/mmlu".to_string(),
            "/nonexistent/mmlu".to_string(),
        ),
        (
            bad.to_str().unwrap().to_string(),
            format!(
                "{}: is not a readable Arrow IPC file",
                bad.join("astronomy/validation/data-00000-of-00001.arrow")
                    .display()
            ),
        ),
    ] {
        let res = tmp.path().join("bad-results");
        let o = shears(
            BIN,
            &[
                "eval",
                "--model",
                m,
                "--tasks",
                "mmlu_rc_val",
                "--mmlu-dir",
                &dir,
                "--output-path",
                res.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&want) && !err.contains("panicked"), "{err}");
        assert!(!res.exists(), "a failed run leaves no results");
    }
}
