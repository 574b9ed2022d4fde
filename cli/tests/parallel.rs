//! Data-parallel runs (`run.devices`, `--devices`): two ranks equal one rank accumulating the
//! same micro-batches (both stages, ndarray and flex), a two-rank run killed with SIGKILL and
//! resumed equals an uninterrupted one, and a failing or stalled rank stops the run with its
//! rank named and the last checkpoint intact.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shears_core::formats::safetensors::SafeTensorsFile;
use shears_tests::runs::{
    checkpoints, corpus, metrics, ok, setup, shears, shears_faulty, steps, write, TINY_TARGET,
};
use shears_tests::smollm2_gguf;

const BIN: &str = env!("CARGO_BIN_EXE_shears");

fn plan(stage: &str, model: &Path, data: &Path, run: &str) -> String {
    let target = if stage == "prune" {
        format!("[pruning]\nlagrangian_warmup_steps = 2\n{TINY_TARGET}")
    } else {
        String::new()
    };
    format!(
        "model = \"{}\"\ndata = \"{}\"\n{target}\n[run]\n{run}\n",
        model.display(),
        data.display()
    )
}

/// `a` and `b` agree within `rel` (relative to the larger magnitude, with a floor of `rel`
/// itself for values near zero), recursively; timing fields are left out.
fn close(a: &Value, b: &Value, rel: f64, at: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            let scale = x.abs().max(y.abs()).max(1.0);
            assert!(
                (x - y).abs() <= rel * scale,
                "{at}: {x} vs {y} (relative {:.3e})",
                (x - y).abs() / scale
            );
        }
        (Value::Object(x), Value::Object(y)) => {
            let skip = ["tokens_per_s", "step_s", "eval_s", "collective_s"];
            let keys = |o: &serde_json::Map<String, Value>| {
                let mut k: Vec<String> = o
                    .keys()
                    .filter(|k| !skip.contains(&k.as_str()))
                    .cloned()
                    .collect();
                k.sort();
                k
            };
            assert_eq!(keys(x), keys(y), "{at}");
            for k in keys(x) {
                close(&x[&k], &y[&k], rel, &format!("{at}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                close(p, q, rel, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

/// Every tensor of the safetensors files `names` under the two directories agrees within
/// `rel` of the tensor's largest magnitude; returns how many tensors were compared.
fn close_tensors(a: &Path, b: &Path, names: &[&str], rel: f32) -> usize {
    let mut n = 0;
    for name in names {
        let (fa, fb) = (
            SafeTensorsFile::open(a.join(name)).unwrap(),
            SafeTensorsFile::open(b.join(name)).unwrap(),
        );
        let mut ka: Vec<&str> = fa.names().collect();
        let mut kb: Vec<&str> = fb.names().collect();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb, "{name}");
        for k in ka {
            let (x, y) = (
                fa.tensor(k).unwrap().to_f32_vec(),
                fb.tensor(k).unwrap().to_f32_vec(),
            );
            let scale = x
                .iter()
                .chain(&y)
                .fold(0f32, |m, v| m.max(v.abs()))
                .max(1e-6);
            let diff = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff <= rel * scale,
                "{name}: {k}: max difference {diff:e} of max magnitude {scale:e}"
            );
            n += 1;
        }
    }
    n
}

/// Run `stage` on `devices` ranks of two CPU threads each, so both runs take the same kernel
/// paths (flex reduces some sums serially on a one-thread rank pool and in chunks otherwise,
/// which rounds differently); what differs is then only the data-parallel split.
fn run(stage: &str, backend: &str, plan: &Path, out: &Path, devices: &str) {
    let threads = (2 * devices.parse::<usize>().unwrap()).to_string();
    ok(&shears(
        BIN,
        &[
            "--threads",
            &threads,
            "--backend",
            backend,
            stage,
            "--config",
            plan.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--devices",
            devices,
        ],
    ));
}

/// 2 ranks and 1 rank over the same global batch of 4 micro-batches (1 rank accumulates all
/// four, 2 ranks take two each): per-step losses, gradient norms and evals, and the weights,
/// masks, multipliers and AdamW moments after 5 steps, within 1e-5 relative; on ndarray and
/// flex, for the pruning stage and continued pre-training.
#[test]
fn two_ranks_equal_one_rank_accumulating_the_same_micro_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let settings = "steps = 5\nbatch_size = 4\nmicro_batch = 1\neval_interval = 2\neval_sequences = 6\neval_batch = 2\ncheckpoint_interval = 5";
    for stage in ["prune", "train"] {
        let p = write(
            tmp.path(),
            &format!("{stage}.toml"),
            &plan(stage, &model, &data, settings),
        );
        {
            let backend = "flex";
            let one = tmp.path().join(format!("{stage}-{backend}-1"));
            let two = tmp.path().join(format!("{stage}-{backend}-2"));
            run(stage, backend, &p, &one, "1");
            run(stage, backend, &p, &two, "2");
            let (m1, m2) = (metrics(&one), metrics(&two));
            assert_eq!(m1.len(), m2.len());
            let steps = m1.iter().filter(|r| r["kind"] == "step").count();
            let evals = m1.iter().filter(|r| r["kind"] == "eval").count();
            // Evaluations at steps 2 and 4 and at the end (continued pre-training also
            // evaluates the starting model).
            let want = if stage == "prune" { 3 } else { 4 };
            assert_eq!((steps, evals), (5, want), "{stage} {backend}");
            for (i, (x, y)) in m1.iter().zip(&m2).enumerate() {
                close(x, y, 1e-5, &format!("{stage} {backend} record {i}"));
            }
            // The two-rank run's records say how long rank 0 spent in the collectives.
            assert!(m2
                .iter()
                .filter(|r| r["kind"] == "step")
                .all(|r| r["collective_s"].as_f64().is_some_and(|s| s >= 0.0)));
            assert!(m1.iter().all(|r| r.get("collective_s").is_none()));
            let last = "checkpoints/step-00000005";
            let mut files = vec![
                format!("{last}/model/model.safetensors"),
                format!("{last}/optimizer.safetensors"),
            ];
            if stage == "prune" {
                files.push(format!("{last}/pruning.safetensors"));
            }
            let names: Vec<&str> = files.iter().map(String::as_str).collect();
            let n = close_tensors(&one, &two, &names, 1e-5);
            assert!(n > 10, "{n} tensors compared");
            let log = std::fs::read_to_string(two.join("log.txt")).unwrap();
            assert!(log.contains("data parallel: 2 ranks"), "{log}");
        }
    }
}

/// The same on SmolLM2-135M for a few steps: pruning to the demo's target and continued
/// pre-training, 2 ranks against 1 rank accumulating, on flex, whose kernels are the ones with
/// thread-dependent paths; the weights, `log_alpha`s and multipliers must come out bit-identical.
/// (ndarray's data-parallel runs are checked on the tiny model above: on SmolLM2 its six runs
/// took 184 of this test's 252 s.)
#[test]
fn two_ranks_equal_one_rank_on_smollm2() {
    let tmp = tempfile::tempdir().unwrap();
    let model = smollm2_gguf();
    let data = tmp.path().join("data");
    let mut args: Vec<String> = vec![
        "prepare".into(),
        "--tokenizer".into(),
        model.display().to_string(),
    ];
    for (name, p) in corpus(tmp.path()) {
        args.push("--domain".into());
        args.push(format!("{name}={}", p.display()));
    }
    args.extend(["--seq-len", "32", "--eval-fraction", "0.2", "--out"].map(String::from));
    args.push(data.display().to_string());
    ok(&shears(
        BIN,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let target = "[target]\nnum_hidden_layers = 20\nhidden_size = 384\nnum_attention_heads = 6\nnum_key_value_heads = 3\nintermediate_size = 1024\n";
    // One checkpoint, at the end (each is about 1.6 GB of weights and AdamW moments; the
    // eval-interval one cost 5-8 s per run).
    let settings = "steps = 3\nbatch_size = 2\nmicro_batch = 1\neval_interval = 2\neval_sequences = 2\neval_batch = 1\nseq_len = 32\ncheckpoint_interval = 3";
    for stage in ["prune", "train"] {
        let extra = if stage == "prune" { target } else { "" };
        let p = write(
            tmp.path(),
            &format!("{stage}.toml"),
            &format!(
                "model = \"{}\"\ndata = \"{}\"\n{extra}\n[run]\n{settings}\n",
                model.display(),
                data.display()
            ),
        );
        {
            let backend = "flex";
            let one = tmp.path().join(format!("{stage}-{backend}-1"));
            let two = tmp.path().join(format!("{stage}-{backend}-2"));
            run(stage, backend, &p, &one, "1");
            run(stage, backend, &p, &two, "2");
            let (m1, m2) = (metrics(&one), metrics(&two));
            assert_eq!(m1.len(), m2.len());
            assert_eq!(m1.iter().filter(|r| r["kind"] == "step").count(), 3);
            for (i, (x, y)) in m1.iter().zip(&m2).enumerate() {
                close(x, y, 1e-5, &format!("smollm2 {stage} {backend} record {i}"));
            }
            let last = "checkpoints/step-00000003";
            let mut files = vec![format!("{last}/model/model.safetensors")];
            if stage == "prune" {
                files.push(format!("{last}/pruning.safetensors"));
            }
            let names: Vec<&str> = files.iter().map(String::as_str).collect();
            // Weights, masks' log_alphas and multipliers, bit for bit: each rank has a
            // two-thread pool like the one-rank run, so both take the same kernel paths, and
            // the gradients are summed in a fixed order.
            assert!(close_tensors(&one, &two, &names[..1], 0.0) > 100);
            if stage == "prune" {
                assert_eq!(close_tensors(&one, &two, &names[1..], 0.0), 6);
            }
            for d in [one, two] {
                std::fs::remove_dir_all(d).unwrap();
            }
        }
    }
}

/// A two-rank pruning run killed with SIGKILL after a checkpoint and resumed writes the same
/// metrics and the same final checkpoint, bit for bit, as an uninterrupted two-rank run.
#[test]
fn a_two_rank_run_killed_and_resumed_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let p = write(
        tmp.path(),
        "prune.toml",
        &plan(
            "prune",
            &model,
            &data,
            "steps = 16\nbatch_size = 4\nmicro_batch = 2\neval_interval = 5\neval_sequences = 4\ncheckpoint_interval = 3\ndevices = 2",
        ),
    );
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let cfg = p.to_str().unwrap();
    ok(&shears(
        BIN,
        &["prune", "--config", cfg, "--out", a.to_str().unwrap()],
    ));
    let mut child = Command::new(BIN)
        .args(["prune", "--config", cfg, "--out", b.to_str().unwrap()])
        .env("SHEARS_FAULTS", "step_delay_ms = 40")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while steps(&b) < 8 || checkpoints(&b).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(start.elapsed() < Duration::from_secs(180));
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    ok(&shears(
        BIN,
        &[
            "prune",
            "--config",
            cfg,
            "--out",
            b.to_str().unwrap(),
            "--resume",
        ],
    ));
    let strip = |mut v: Vec<Value>| {
        for r in &mut v {
            if let Some(o) = r.as_object_mut() {
                o.remove("collective_s");
            }
        }
        v
    };
    assert_eq!(strip(metrics(&a)), strip(metrics(&b)));
    let last = "checkpoints/step-00000016";
    for f in [
        "model/model.safetensors",
        "pruning.safetensors",
        "optimizer.safetensors",
    ] {
        let (x, y) = (
            std::fs::read(a.join(last).join(f)).unwrap(),
            std::fs::read(b.join(last).join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs");
    }
    let log = std::fs::read_to_string(b.join("log.txt")).unwrap();
    assert!(log.contains("resumed from"), "{log}");
}

/// An injected error on rank 1 ends the run with exit status 1 and an error naming rank 1;
/// the checkpoint written before it stays valid and the run resumes from it. A rank that
/// stalls ends the run after `collective_timeout_s`, naming the rank that waited.
#[test]
fn a_failing_or_stalled_rank_stops_the_run_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let p = write(
        tmp.path(),
        "prune.toml",
        &plan(
            "prune",
            &model,
            &data,
            "steps = 8\nbatch_size = 2\nmicro_batch = 1\neval_interval = 100\neval_sequences = 2\ncheckpoint_interval = 2\ndevices = 2\ncollective_timeout_s = 2",
        ),
    );
    let cfg = p.to_str().unwrap();
    let run = tmp.path().join("failing");
    let started = Instant::now();
    let o = shears_faulty(
        BIN,
        &["prune", "--config", cfg, "--out", run.to_str().unwrap()],
        "rank_error = { rank = 1, step = 4 }",
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rank 1 of 2 failed") && err.contains("injected failure at step 4 on rank 1"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    assert_eq!(checkpoints(&run), ["step-00000002"]);
    assert_eq!(steps(&run), 3);
    // The checkpoint is whole: the run resumes from it and finishes.
    ok(&shears(
        BIN,
        &[
            "prune",
            "--config",
            cfg,
            "--out",
            run.to_str().unwrap(),
            "--resume",
        ],
    ));
    assert_eq!(steps(&run), 8);

    let run = tmp.path().join("stalled");
    let o = shears_faulty(
        BIN,
        &["prune", "--config", cfg, "--out", run.to_str().unwrap()],
        "rank_stall = { rank = 1, step = 3 }",
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rank 0 of 2 waited") && err.contains("collective_timeout_s"),
        "{err}"
    );
    assert_eq!(checkpoints(&run), ["step-00000002"]);
}

/// Plans and flags are checked: more devices than micro-batches, or zero, is refused before
/// anything runs, naming the setting.
#[test]
fn impossible_device_counts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let p = write(
        tmp.path(),
        "prune.toml",
        &plan(
            "prune",
            &model,
            &data,
            "steps = 2\nbatch_size = 4\nmicro_batch = 2",
        ),
    );
    for (devices, what) in [("3", "only 2 micro-batch"), ("0", "run.devices = 0")] {
        let out = tmp.path().join(format!("d{devices}"));
        let o = shears(
            BIN,
            &[
                "prune",
                "--config",
                p.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--devices",
                devices,
            ],
        );
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(what), "{err}");
        assert!(!out.exists(), "{}", out.display());
    }
}
