//! `[pruning] init = "importance"` (method §12) as a user runs it: the pruning run measures
//! activation importance on calibration sequences of its data, keeps the scores as
//! `importance.safetensors`, and starts its masks from their ranking; another run reads the
//! scores back (`importance_file`) for another target; bad settings are refused before any run
//! directory exists.

use std::path::Path;

use shears_core::ModelFiles;
use shears_pruning::{Importance, PruningSpec, TargetShape};
use shears_tests::runs::{assert_refused, ok, setup, shears, TINY_TARGET};

const BIN: &str = env!("CARGO_BIN_EXE_shears");

fn plan(dir: &Path, name: &str, model: &Path, data: &Path, target: &str, pruning: &str) -> String {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "model = \"{}\"\ndata = \"{}\"\n{target}\n[run]\nsteps = 2\nbatch_size = 2\neval_interval = 2\neval_sequences = 2\n[pruning]\n{pruning}\n",
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    p.display().to_string()
}

fn prune(plan: &str, out: &Path) -> std::process::Output {
    shears(
        BIN,
        &["prune", "--config", plan, "--out", out.to_str().unwrap()],
    )
}

#[test]
fn importance_init_measures_keeps_and_reuses_its_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let source = ModelFiles::load(&model).unwrap().config;
    let a = tmp.path().join("a");
    let p = plan(
        tmp.path(),
        "a.toml",
        &model,
        &data,
        TINY_TARGET,
        "init = \"importance\"\ncalib = 8",
    );
    ok(&prune(&p, &a));
    let file = a.join("importance.safetensors");
    let imp = Importance::load(&file, &source).unwrap();
    assert_eq!(imp.tokens, 8 * 32, "8 calibration sequences of 32 tokens");
    assert!(imp.layers.iter().all(|x| *x > 0.0));
    // The masks of the first step started from the ranking: the checkpoint's masks after two
    // steps still keep exactly the importance top-k (two small steps move no log_alpha by 1).
    // TINY_TARGET.
    let target = TargetShape {
        num_hidden_layers: 1,
        hidden_size: 16,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        intermediate_size: 32,
    };
    let spec = PruningSpec::new(&source, target, None).unwrap();
    let want = imp.masks(&spec);
    let o = shears(
        BIN,
        &[
            "finalize",
            "--run",
            a.to_str().unwrap(),
            "--out",
            tmp.path().join("fa").to_str().unwrap(),
        ],
    );
    ok(&o);
    let got = shears_core::formats::safetensors::SafeTensorsFile::open(
        tmp.path().join("fa").join("masks.safetensors"),
    )
    .unwrap();
    for m in spec.modules.clone() {
        let (_, v) = got.read_f32(&format!("z_{}", m.name())).unwrap();
        let kept: Vec<bool> = v.iter().map(|x| *x != 0.0).collect();
        let top: Vec<bool> = want.get(m).unwrap().iter().map(|x| *x != 0.0).collect();
        assert_eq!(kept, top, "{}", m.name());
    }

    // Another target reads the scores back instead of measuring.
    let b = tmp.path().join("b");
    let other = TINY_TARGET.replace("intermediate_size = 32", "intermediate_size = 16");
    let p = plan(
        tmp.path(),
        "b.toml",
        &model,
        &data,
        &other,
        &format!(
            "init = \"importance\"\nimportance_file = \"{}\"",
            file.display()
        ),
    );
    ok(&prune(&p, &b));
    assert!(!b.join("importance.safetensors").exists());
}

#[test]
fn bad_importance_settings_are_refused_before_a_run_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let out = tmp.path().join("run");
    let p = plan(
        tmp.path(),
        "z.toml",
        &model,
        &data,
        TINY_TARGET,
        "init = \"importance\"\ncalib = 0",
    );
    assert_refused(&prune(&p, &out), &["pruning.calib = 0"]);
    assert!(!out.exists());
    // Scores of another model: a file whose metadata names another shape.
    let fake = tmp.path().join("other.safetensors");
    let other = shears_core::LlamaConfig::from_json_str(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":8,
        "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":2,"rms_norm_eps":1e-5}"#,
    )
    .unwrap();
    let imp = Importance {
        heads: vec![vec![1.0, 2.0]],
        intermediate: vec![vec![1.0; 8]],
        hidden: vec![1.0; 8],
        layers: vec![0.5],
        tokens: 4,
    };
    imp.save(&fake, &other).unwrap();
    let p = plan(
        tmp.path(),
        "y.toml",
        &model,
        &data,
        TINY_TARGET,
        &format!(
            "init = \"importance\"\nimportance_file = \"{}\"",
            fake.display()
        ),
    );
    assert_refused(&prune(&p, &out), &["other.safetensors", "another model"]);
    assert!(!out.exists());
}

/// `method = "importance"`: `shears prune` writes the dense target model in one pass (no
/// training steps), with exactly 0/1 masks equal to the importance top-k and the scores beside
/// it; `shears train` distils it from its recorded source; `shears run` takes the same setting
/// (prune and finalize in one stage, training from the data's token shares).
#[test]
fn one_shot_pruning_writes_the_target_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let source = ModelFiles::load(&model).unwrap().config;
    let out = tmp.path().join("oneshot");
    let p = plan(
        tmp.path(),
        "o.toml",
        &model,
        &data,
        TINY_TARGET,
        "method = \"importance\"\ncalib = 8",
    );
    ok(&prune(&p, &out));
    let pruned = ModelFiles::load(&out).unwrap();
    assert_eq!(
        TargetShape::of(&pruned.config),
        TargetShape {
            num_hidden_layers: 1,
            hidden_size: 16,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            intermediate_size: 32,
        }
    );
    let imp = Importance::load(&out.join("importance.safetensors"), &source).unwrap();
    let spec = PruningSpec::new(&source, TargetShape::of(&pruned.config), None).unwrap();
    let want = imp.masks(&spec);
    let masks =
        shears_core::formats::safetensors::SafeTensorsFile::open(out.join("masks.safetensors"))
            .unwrap();
    for m in spec.modules.clone() {
        let (_, v) = masks.read_f32(&format!("z_{}", m.name())).unwrap();
        assert_eq!(v.as_slice(), want.get(m).unwrap(), "{}", m.name());
    }
    // A second one-shot into the same place is refused without --resume (which replaces it).
    assert_refused(&prune(&p, &out), &["oneshot"]);

    // Train it with its source as teacher (recorded in masks.safetensors).
    let train = tmp.path().join("t.toml");
    std::fs::write(
        &train,
        format!(
            "model = \"{}\"\ndata = \"{}\"\n[run]\nsteps = 2\nbatch_size = 2\neval_interval = 2\neval_sequences = 2\n[distill]\nteacher = \"source\"\n",
            out.display(),
            data.display()
        ),
    )
    .unwrap();
    let t = tmp.path().join("train");
    ok(&shears(
        BIN,
        &[
            "train",
            "--config",
            train.to_str().unwrap(),
            "--out",
            t.to_str().unwrap(),
        ],
    ));
}

/// `shears run` with one-shot pruning: the prune stage writes `pruned/` itself, training starts
/// from the data's token shares, and the pipeline finishes (and resumes to the same summary).
#[test]
fn the_pipeline_runs_with_one_shot_pruning() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pipe");
    let p = tmp.path().join("pipeline.toml");
    std::fs::write(
        &p,
        format!(
            "{}\n[prune.pruning]\nmethod = \"importance\"\ncalib = 8\n[train.run]\nsteps = 4\nbatch_size = 2\neval_interval = 2\neval_sequences = 2\n[eval]\nsequences = 3\nbatch = 2\n",
            shears_tests::runs::pipeline_head(tmp.path(), &out)
        ),
    )
    .unwrap();
    ok(&shears(BIN, &["run", p.to_str().unwrap()]));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["pruned"]["config"]["hidden_size"], 16);
    assert!(out.join("pruned").join("importance.safetensors").exists());
    assert!(!out.join("prune").join("checkpoints").exists());
    assert_eq!(shears_tests::runs::steps(&out.join("train")), 4);
    assert!(s["trained"]["per_domain_ppl"].as_object().unwrap().len() == 3);
    ok(&shears(BIN, &["run", p.to_str().unwrap(), "--resume"]));
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(again, s);
}
