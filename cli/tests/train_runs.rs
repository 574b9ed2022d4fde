//! The pruning and continued pre-training stages end to end on the tiny model: exact resume
//! after `kill -9`, reaching the target, dynamic batch loading, and the guards.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use shears_tests::runs::{
    checkpoints, metrics, ok, setup, shears, shears_faulty, steps, write, KillResume, TINY_TARGET,
};

const BIN: &str = env!("CARGO_BIN_EXE_shears");

fn prune_plan(model: &Path, data: &Path, run: &str, extra: &str) -> String {
    format!(
        "model = \"{}\"\ndata = \"{}\"\n{extra}\n{TINY_TARGET}\n[run]\n{run}\n",
        model.display(),
        data.display()
    )
}

/// `shears STAGE --config PLAN --out RUN`, with `faults` (a `SHEARS_FAULTS` table) injected
/// when given: the one way these tests start a run.
fn stage_run(stage: &str, plan: &Path, out: &Path, faults: Option<&str>) -> std::process::Output {
    let args = [
        stage,
        "--config",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    match faults {
        Some(f) => shears_faulty(BIN, &args, f),
        None => shears(BIN, &args),
    }
}

/// The files of a pruning checkpoint that a resumed run must reproduce byte for byte.
const PRUNE_FILES: [&str; 3] = [
    "model/model.safetensors",
    "pruning.safetensors",
    "optimizer.safetensors",
];

#[test]
fn pruning_resumes_exactly_after_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let plan = write(
        tmp.path(),
        "prune.toml",
        &prune_plan(
            &model,
            &data,
            "steps = 30\nbatch_size = 4\nmicro_batch = 2\neval_interval = 7\ncheckpoint_interval = 5\nkeep_checkpoints = 2\neval_sequences = 4",
            "[pruning]\nlagrangian_warmup_steps = 10",
        ),
    );
    let (a, b) = KillResume {
        stage: "prune",
        plan: &plan,
        kill_in: 6..24,
        last_step: 30,
        files: &PRUNE_FILES,
    }
    .check(BIN, tmp.path());
    let log = std::fs::read_to_string(b.join("log.txt")).unwrap();
    assert!(log.contains("resumed from"), "{log}");
    // keep_checkpoints = 2.
    assert_eq!(checkpoints(&a).len(), 2, "{:?}", checkpoints(&a));

    // Finalize gives exactly the target shape, plus the masks.
    let out = tmp.path().join("pruned");
    ok(&shears(
        BIN,
        &[
            "finalize",
            "--run",
            a.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    ));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 1);
    assert_eq!(cfg["hidden_size"], 16);
    assert_eq!(cfg["num_attention_heads"], 2);
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["intermediate_size"], 32);
    assert!(out.join("masks.safetensors").exists());
    let o = shears(
        BIN,
        &[
            "score",
            "--model",
            out.to_str().unwrap(),
            "--text",
            "the cat sat",
        ],
    );
    ok(&o);
    // The finalized model exports to GGUF and scores the same there (f32 exactly; Q8_0 with
    // every matrix in F16, since its 16-wide rows are not whole 32-element blocks).
    let nll = |model: &Path| -> f64 {
        let o = shears(
            BIN,
            &[
                "score",
                "--model",
                model.to_str().unwrap(),
                "--json",
                "--text",
                "the cat sat on the mat",
            ],
        );
        ok(&o);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["mean_nll"].as_f64().unwrap()
    };
    let base = nll(&out);
    for quant in ["f32", "q8_0"] {
        let g = tmp.path().join(format!("pruned-{quant}.gguf"));
        let o = shears(
            BIN,
            &[
                "export",
                out.to_str().unwrap(),
                "--out",
                g.to_str().unwrap(),
                "--quant",
                quant,
            ],
        );
        ok(&o);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.contains("stored as F16"), quant == "q8_0", "{err}");
        let got = nll(&g);
        let tol = if quant == "f32" { 0.0 } else { 1e-2 * base };
        assert!((got - base).abs() <= tol, "{quant}: {got} vs {base}");
    }
}

/// The dtypes of a safetensors file's tensors, from its header.
fn safetensors_dtypes(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bf16_mixed_pruning_with_layer_checkpointing_resumes_exactly_after_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let plan = write(
        tmp.path(),
        "prune.toml",
        &prune_plan(
            &model,
            &data,
            "steps = 20\nbatch_size = 4\nmicro_batch = 2\neval_interval = 7\ncheckpoint_interval = 4\neval_sequences = 4\nprecision = \"bf16-mixed\"\noptimizer_state = \"bf16\"\ncheckpointing = \"layers\"",
            "[pruning]\nlagrangian_warmup_steps = 10",
        ),
    );
    let (a, b) = KillResume {
        stage: "prune",
        plan: &plan,
        kill_in: 5..16,
        last_step: 20,
        files: &PRUNE_FILES,
    }
    .check(BIN, tmp.path());
    let ma = metrics(&a);
    let last = "checkpoints/step-00000020";
    // The checkpoint holds the f32 master weights, and the plan says what ran.
    let dtypes = safetensors_dtypes(&a.join(format!("{last}/model/model.safetensors")));
    assert!(
        !dtypes.is_empty() && dtypes.iter().all(|d| d == "F32"),
        "{dtypes:?}"
    );
    let resolved = std::fs::read_to_string(a.join("resolved.toml")).unwrap();
    for want in [
        "precision = \"bf16-mixed\"",
        "optimizer_state = \"bf16\"",
        "checkpointing = \"layers\"",
    ] {
        assert!(resolved.contains(want), "{want} not in {resolved}");
    }
    // Finite losses throughout.
    let losses: Vec<f64> = ma
        .iter()
        .filter(|m| m["kind"] == "step")
        .map(|m| m["lm_loss"].as_f64().unwrap())
        .collect();
    assert!(
        losses.len() == 20 && losses.iter().all(|l| l.is_finite()),
        "{losses:?}"
    );
    // A command-line override that changes the plan is refused on resume.
    let o = shears(
        BIN,
        &[
            "prune",
            "--config",
            plan.to_str().unwrap(),
            "--out",
            b.to_str().unwrap(),
            "--resume",
            "--precision",
            "f32",
        ],
    );
    assert!(!o.status.success());
}

fn evals(run: &Path) -> Vec<Value> {
    metrics(run)
        .into_iter()
        .filter(|r| r["kind"] == "eval")
        .collect()
}

#[test]
fn pruning_reaches_the_target_and_lambda_moves_as_the_spec_says() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let plan = write(
        tmp.path(),
        "prune.toml",
        &prune_plan(
            &model,
            &data,
            "steps = 160\nbatch_size = 4\neval_interval = 10\neval_sequences = 2\ncheckpoint_interval = 80",
            "",
        ),
    );
    let run = tmp.path().join("run");
    ok(&stage_run("prune", &plan, &run, None));
    let ev = evals(&run);
    let lag: Vec<f64> = metrics(&run)
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["lagrangian_loss"].as_f64().unwrap())
        .collect();
    assert!(lag[5..].iter().all(|l| *l != 0.0), "{lag:?}");
    assert_eq!(ev.len(), 16);
    assert_eq!(ev[0]["step"], 10);
    let last = ev.last().unwrap();
    for (m, want) in last["final_target_sparsity"].as_object().unwrap() {
        let got = last["expected_sparsity"][m].as_f64().unwrap();
        assert!(
            (got - want.as_f64().unwrap()).abs() < 0.02,
            "{m}: expected sparsity {got}, target {want}"
        );
    }
    // λ1 gets the gradient (e − t) and is ascended: while the expected sparsity is below the
    // ramped target, λ1 falls (first eval: e < t); λ2 gets (e − t)² ≥ 0, so it never falls.
    let first = &ev[0];
    for (m, e) in first["expected_sparsity"].as_object().unwrap() {
        let t = first["target_sparsity"][m].as_f64().unwrap();
        assert!(e.as_f64().unwrap() < t, "{m}");
        assert!(
            first["lambda"][m][0].as_f64().unwrap() < 0.0,
            "{m}: {}",
            first["lambda"][m]
        );
    }
    for w in ev.windows(2) {
        for m in ["hidden", "layer", "intermediate", "kv_heads"] {
            assert!(
                w[1]["lambda"][m][1].as_f64().unwrap() >= w[0]["lambda"][m][1].as_f64().unwrap()
            );
        }
    }
    // The report: plots and a page with the plan and the final table.
    let o = shears(BIN, &["report", run.to_str().unwrap()]);
    ok(&o);
    let page = std::fs::read_to_string(run.join("report/index.html")).unwrap();
    for f in [
        "loss.svg",
        "domain_loss.svg",
        "domain_weights.svg",
        "sparsity.svg",
        "lambda.svg",
    ] {
        let svg = std::fs::read_to_string(run.join("report").join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{f}");
        assert!(page.contains(f), "{f}");
    }
    assert!(page.contains("Final evaluation (step 160)") && page.contains("num_hidden_layers = 1"));
    let o = shears(BIN, &["report", tmp.path().join("nope").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("metrics.jsonl"));

    let out = tmp.path().join("pruned");
    let o = shears(
        BIN,
        &[
            "finalize",
            "--run",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    ok(&o);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["step"], 160);
    assert_eq!(r["config"]["num_hidden_layers"], 1);
    assert_eq!(r["config"]["intermediate_size"], 32);
    // An existing model is not overwritten without --force.
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
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a model"));
}

fn train_plan(model: &Path, data: &Path, run: &str, extra: &str) -> String {
    format!(
        "model = \"{}\"\ndata = \"{}\"\n{extra}\n[run]\n{run}\n",
        model.display(),
        data.display()
    )
}

#[test]
fn training_resumes_exactly_after_kill_9_and_after_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let plan = write(
        tmp.path(),
        "train.toml",
        &train_plan(
            &model,
            &data,
            "steps = 30\nbatch_size = 4\nmicro_batch = 1\neval_interval = 6\ncheckpoint_interval = 4\neval_sequences = 3",
            "[optim]\nlr = 0.003",
        ),
    );
    let (a, _) = KillResume {
        stage: "train",
        plan: &plan,
        kill_in: 5..24,
        last_step: 30,
        files: &["model/model.safetensors", "optimizer.safetensors"],
    }
    .check(BIN, tmp.path());
    let ma = metrics(&a);
    // eval_first: an eval before step 1, then every 6 steps, and one at the end.
    let steps_of: Vec<u64> = ma
        .iter()
        .filter(|r| r["kind"] == "eval")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps_of, vec![0, 6, 12, 18, 24, 30]);
    // The loss went down.
    let first = ma.iter().find(|r| r["kind"] == "step").unwrap()["lm_loss"]
        .as_f64()
        .unwrap();
    let last = ma.iter().rev().find(|r| r["kind"] == "step").unwrap()["lm_loss"]
        .as_f64()
        .unwrap();
    assert!(last < first, "{first} -> {last}");

    // SIGTERM: a checkpoint at the current step, exit status 130, then an exact resume.
    let c = tmp.path().join("train-c");
    let cfg = plan.display().to_string();
    let mut child = Command::new(BIN)
        .args(["train", "--config", &cfg, "--out", c.to_str().unwrap()])
        .env("SHEARS_FAULTS", "step_delay_ms = 40")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while steps(&c) < 9 {
        assert!(child.try_wait().unwrap().is_none());
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let stopped = steps(&c);
    assert!(
        c.join("checkpoints")
            .join(format!("step-{stopped:08}"))
            .exists(),
        "{:?}",
        checkpoints(&c)
    );
    // Without --resume an existing run is refused.
    let o = shears(
        BIN,
        &["train", "--config", &cfg, "--out", c.to_str().unwrap()],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    ok(&shears(
        BIN,
        &[
            "train",
            "--config",
            &cfg,
            "--out",
            c.to_str().unwrap(),
            "--resume",
        ],
    ));
    assert_eq!(metrics(&c), ma);
}

fn weights_over_evals(run: &Path, domain: &str) -> Vec<f64> {
    evals(run)
        .iter()
        .map(|r| r["domain_weights"][domain].as_f64().unwrap())
        .collect()
}

#[test]
fn dynamic_batch_loading_raises_a_lagging_domain_and_constant_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let run_cfg = "steps = 8\nbatch_size = 2\neval_interval = 2\neval_sequences = 2";
    // alpha's reference is far below its loss (it lags); the others are at their loss.
    let dbl = "[dbl]\ninitial_weights = { alpha = 1.0, beta = 1.0, gamma = 1.0 }\nreference = { source = \"given\", losses = { alpha = 5.0, beta = 5.6, gamma = 5.6 } }";
    let code = write(
        tmp.path(),
        "code.toml",
        &train_plan(&model, &data, run_cfg, dbl),
    );
    let constant = write(
        tmp.path(),
        "constant.toml",
        &train_plan(
            &model,
            &data,
            run_cfg,
            &format!("{dbl}\nrule = {{ rule = \"constant\" }}"),
        ),
    );
    for (plan, name) in [(&code, "code"), (&constant, "constant")] {
        let out = tmp.path().join(name);
        ok(&stage_run("train", plan, &out, None));
    }
    let w = weights_over_evals(&tmp.path().join("code"), "alpha");
    assert_eq!(w.len(), 5);
    assert!(w[0] > 1.0 / 3.0 + 0.05, "{w:?}");
    for p in w.windows(2) {
        assert!(p[1] > p[0], "alpha's weight must rise: {w:?}");
    }
    let beta = weights_over_evals(&tmp.path().join("code"), "beta");
    assert!(beta.last().unwrap() < &(1.0 / 3.0), "{beta:?}");
    for d in ["alpha", "beta", "gamma"] {
        for x in weights_over_evals(&tmp.path().join("constant"), d) {
            assert!((x - 1.0 / 3.0).abs() < 1e-12, "{d}: {x}");
        }
    }
    // The batches follow the weights: with the code rule, alpha is drawn more often after the
    // first update than with the constant rule. (The sampler's draw counts are in the state.)
    let state = |name: &str| -> Value {
        let p = tmp
            .path()
            .join(name)
            .join("checkpoints/step-00000008/state.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let drawn = |v: &Value, d: &str| v["sampler"]["domains"][d]["drawn"].as_u64().unwrap();
    let (c, k) = (state("code"), state("constant"));
    assert!(
        drawn(&c, "alpha") > drawn(&k, "alpha"),
        "{} vs {}",
        drawn(&c, "alpha"),
        drawn(&k, "alpha")
    );
}

#[test]
fn non_finite_steps_are_skipped_and_k_in_a_row_stop_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let one = write(
        tmp.path(),
        "one.toml",
        &prune_plan(
            &model,
            &data,
            "steps = 6\nbatch_size = 2\neval_sequences = 1\nmax_bad_steps = 2",
            "",
        ),
    );
    let run = tmp.path().join("one");
    ok(&stage_run(
        "prune",
        &one,
        &run,
        Some("nan_loss_at_steps = [3]"),
    ));
    let m = metrics(&run);
    let s3 = m
        .iter()
        .find(|r| r["kind"] == "step" && r["step"] == 3)
        .unwrap();
    assert_eq!(s3["skipped"], true);
    assert_eq!(s3["lm_loss"], "NaN");
    assert!(
        m.iter()
            .filter(|r| r["kind"] == "step" && r["skipped"] == true)
            .count()
            == 1
    );
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    assert!(log.contains("step 3: non-finite loss"), "{log}");

    let two = write(
        tmp.path(),
        "two.toml",
        &prune_plan(
            &model,
            &data,
            "steps = 9\nbatch_size = 2\neval_sequences = 1\nmax_bad_steps = 2",
            "",
        ),
    );
    let run = tmp.path().join("two");
    let o = stage_run("prune", &two, &run, Some("nan_loss_at_steps = [4, 5, 6]"));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("2 consecutive steps had a non-finite loss"),
        "{err}"
    );
    assert!(
        run.join("checkpoints/step-00000005/MANIFEST.json").exists(),
        "{:?}",
        checkpoints(&run)
    );
}

#[test]
fn a_failed_checkpoint_write_is_a_clear_error_and_keeps_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let plan = write(
        tmp.path(),
        "p.toml",
        &prune_plan(
            &model,
            &data,
            "steps = 8\nbatch_size = 2\neval_sequences = 1\ncheckpoint_interval = 2",
            "",
        ),
    );
    let run = tmp.path().join("run");
    let o = stage_run(
        "prune",
        &plan,
        &run,
        Some("checkpoint_error_at_steps = [4]"),
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    assert_eq!(checkpoints(&run), vec!["step-00000002".to_string()]);
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    // Bad plans fail clearly.
    let bad = write(tmp.path(), "bad.toml", "model = 'x'\n");
    let o = shears(BIN, &["prune", "--config", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.toml"));
    // Fault injection is not part of a plan; a malformed SHEARS_FAULTS is named.
    let faults = write(
        tmp.path(),
        "faults.toml",
        &prune_plan(
            &model,
            &data,
            "steps = 2\nbatch_size = 2",
            "[faults]\nnan_loss_at_steps = [1]",
        ),
    );
    let o = shears(BIN, &["prune", "--config", faults.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("faults"), "{err}");
    let o = shears_faulty(
        BIN,
        &[
            "prune",
            "--config",
            plan.to_str().unwrap(),
            "--out",
            tmp.path().join("f").to_str().unwrap(),
        ],
        "nan_loss_at = 1",
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("SHEARS_FAULTS"), "{err}");
}
