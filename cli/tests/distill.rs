//! Distillation in continued pre-training end to end on the tiny model: `shears run` with the
//! source as teacher, `shears train` finding the source a finalized model records, exact resume
//! after `kill -9` with a teacher, and the refusals (no recorded source, a teacher with another
//! tokenizer or a shorter context, settings out of range).

use std::path::Path;

use serde_json::Value;
use shears_tests::runs::{
    assert_refused, metrics, ok, pipeline_head, setup, shears, write, KillResume, TINY_TARGET,
};

const BIN: &str = env!("CARGO_BIN_EXE_shears");

fn pipeline_plan(dir: &Path, out: &Path) -> String {
    format!(
        r#"{}
[prune.run]
steps = 8
batch_size = 2
eval_interval = 4
eval_sequences = 2
[train.run]
steps = 12
batch_size = 2
eval_interval = 6
eval_sequences = 2
[train.optim]
lr = 0.003
[train.distill]
teacher = "source"
alpha = 0.5
temperature = 2.0
top_k = 8
[eval]
sequences = 3
batch = 2
"#,
        pipeline_head(dir, out)
    )
}

fn steps_of(run: &Path) -> Vec<Value> {
    metrics(run)
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .collect()
}

#[test]
fn pipeline_distils_from_its_source_and_train_resumes_exactly_with_a_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pipe");
    let p = write(
        tmp.path(),
        "pipeline.toml",
        &pipeline_plan(tmp.path(), &out),
    );
    ok(&shears(BIN, &["run", p.to_str().unwrap()]));
    // The train stage's plan names the source model as teacher; every step logs the KD term,
    // and the objective is (1 - alpha)·LM + alpha·KD.
    let plan = std::fs::read_to_string(out.join("train/plan.toml")).unwrap();
    assert!(
        plan.contains("[distill]") && plan.contains("tiny.gguf"),
        "{plan}"
    );
    let steps = steps_of(&out.join("train"));
    assert_eq!(steps.len(), 12);
    for r in &steps {
        let (lm, kd, loss) = (
            r["lm_loss"].as_f64().unwrap(),
            r["kd_loss"].as_f64().unwrap(),
            r["loss"].as_f64().unwrap(),
        );
        assert!(kd > 0.0, "{r}");
        assert!((loss - (0.5 * lm + 0.5 * kd)).abs() < 1e-9 * loss, "{r}");
    }
    // The pruning stage has no KD term.
    assert!(steps_of(&out.join("prune"))
        .iter()
        .all(|r| r.get("kd_loss").is_none()));

    // `shears train` on the finalized model: "source" is what finalize recorded.
    let data = out.join("data");
    let pruned = out.join("pruned");
    let plan = write(
        tmp.path(),
        "train.toml",
        &format!(
            "model = \"{}\"\ndata = \"{}\"\n[run]\nsteps = 16\nbatch_size = 2\nmicro_batch = 1\neval_interval = 8\ncheckpoint_interval = 4\neval_sequences = 2\n[optim]\nlr = 0.003\n[distill]\nteacher = \"source\"\nloss = \"reverse_kl\"\n",
            pruned.display(),
            data.display()
        ),
    );
    let (a, _) = KillResume {
        stage: "train",
        plan: &plan,
        kill_in: 7..8,
        last_step: 16,
        files: &["model/model.safetensors", "optimizer.safetensors"],
    }
    .check(BIN, tmp.path());
    let steps = steps_of(&a);
    // alpha = 1 (the default): the objective is the KD term alone.
    assert!(steps
        .iter()
        .all(|r| r["loss"] == r["kd_loss"] && r["lm_loss"].as_f64().unwrap() > 0.0));
}

#[test]
fn teachers_that_cannot_be_used_are_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let plan = |name: &str, distill: &str| {
        write(
            tmp.path(),
            name,
            &format!(
                "model = \"{}\"\ndata = \"{}\"\n[run]\nsteps = 2\nbatch_size = 2\n[distill]\n{distill}\n",
                model.display(),
                data.display()
            ),
        )
    };
    let train = |p: &Path, out: &str| {
        let out = tmp.path().join(out);
        let o = shears(
            BIN,
            &[
                "train",
                "--config",
                p.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        (o, out)
    };
    // "source" on a model shears did not finalize.
    let (o, out) = train(&plan("a.toml", "teacher = \"source\""), "a");
    assert_refused(&o, &["does not record the model it was pruned from"]);
    assert!(!out.join("checkpoints").exists());
    // Settings out of range.
    let (o, _) = train(&plan("b.toml", "teacher = \"x\"\nalpha = 1.5"), "b");
    assert_refused(&o, &["distill.alpha = 1.5"]);
    let (o, _) = train(&plan("c.toml", "teacher = \"x\"\ntemperature = 0"), "c");
    assert_refused(&o, &["distill.temperature"]);
    let (o, _) = train(&plan("d.toml", "teacher = \"x\"\nloss = \"js\""), "d");
    assert_refused(&o, &["loss"]);
    // A teacher that does not exist.
    let (o, _) = train(&plan("e.toml", "teacher = \"/nonexistent/teacher\""), "e");
    assert_refused(&o, &["/nonexistent/teacher"]);
    // A teacher with another tokenizer: the tiny model imported, its tokenizer.json edited.
    let other = tmp.path().join("other");
    ok(&shears(
        BIN,
        &[
            "import",
            model.to_str().unwrap(),
            "--out",
            other.to_str().unwrap(),
        ],
    ));
    let tok = other.join("tokenizer.json");
    let text = std::fs::read_to_string(&tok).unwrap();
    std::fs::write(&tok, text.replacen('{', "{ ", 1)).unwrap();
    let (o, out) = train(
        &plan("f.toml", &format!("teacher = \"{}\"", other.display())),
        "f",
    );
    assert_refused(&o, &["another tokenizer than the student"]);
    assert!(!out.join("checkpoints").exists());
    // A teacher that cannot attend over the training sequences (32 tokens).
    let short = tmp.path().join("short");
    ok(&shears(
        BIN,
        &[
            "import",
            model.to_str().unwrap(),
            "--out",
            short.to_str().unwrap(),
        ],
    ));
    let cfg = short.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["max_position_embeddings"] = 16.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let (o, out) = train(
        &plan("g.toml", &format!("teacher = \"{}\"", short.display())),
        "g",
    );
    assert_refused(&o, &["at most 16 positions", "32 tokens"]);
    assert!(!out.join("checkpoints").exists());
}

/// KD while pruning (`[distill]` in a prune plan, `teacher = "source"`: the model being pruned,
/// frozen): every step logs the KD term and minimises `(1 − α)·LM + α·KD + Lagrangian`; layer
/// checkpointing computes the same losses; the pipeline's `[prune.distill]` does the same.
#[test]
fn pruning_distils_from_its_frozen_source() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let run = |name: &str, extra: &str| -> Vec<Value> {
        let plan = write(
            tmp.path(),
            &format!("{name}.toml"),
            &format!(
                "model = \"{}\"\ndata = \"{}\"\n{TINY_TARGET}\n[run]\nsteps = 3\nbatch_size = 2\nmicro_batch = 1\neval_interval = 3\neval_sequences = 2\n{extra}\n[optim]\nlr = 0.02\n[distill]\nteacher = \"source\"\nalpha = 0.7\n",
                model.display(),
                data.display()
            ),
        );
        let out = tmp.path().join(name);
        ok(&shears(
            BIN,
            &[
                "prune",
                "--config",
                plan.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        ));
        steps_of(&out)
    };
    let plain = run("kd", "");
    let layers = run("kd-layers", "checkpointing = \"layers\"");
    assert_eq!(plain.len(), 3);
    for (a, b) in plain.iter().zip(&layers) {
        let (lm, kd, lag, loss) = (
            a["lm_loss"].as_f64().unwrap(),
            a["kd_loss"].as_f64().unwrap(),
            a["lagrangian_loss"].as_f64().unwrap(),
            a["loss"].as_f64().unwrap(),
        );
        // Step 1: the sampled masks are all 1 and the student is its teacher (KD 0 to
        // rounding); from then on the weights have moved.
        if a["step"] == 1 {
            assert!(kd.abs() < 1e-6, "{a}");
        } else {
            assert!(kd > 1e-6, "{a}");
        }
        assert!(
            (loss - (0.3 * lm + 0.7 * kd + lag)).abs() < 1e-9 * loss.abs().max(1.0),
            "{a}"
        );
        for k in ["lm_loss", "kd_loss", "lagrangian_loss"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1e-3) + 1e-8,
                "{k}: {x} vs {y}"
            );
        }
        if a["step"] != 1 {
            let (x, y) = (
                a["kd_loss"].as_f64().unwrap(),
                b["kd_loss"].as_f64().unwrap(),
            );
            assert!(x > 0.0 && y > 0.0);
        }
    }
}
