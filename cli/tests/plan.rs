//! `shears plan` reproduces the spec's numbers for LLaMA2-7B → Sheared-LLaMA-2.7B / 1.3B from
//! configs alone, plans GQA models, and refuses bad targets clearly.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

const LLAMA2_7B: &str = r#"{"architectures":["LlamaForCausalLM"],"bos_token_id":1,"eos_token_id":2,
"hidden_act":"silu","hidden_size":4096,"initializer_range":0.02,"intermediate_size":11008,
"max_position_embeddings":4096,"model_type":"llama","num_attention_heads":32,"num_hidden_layers":32,
"num_key_value_heads":32,"pretraining_tp":1,"rms_norm_eps":1e-05,"rope_scaling":null,
"tie_word_embeddings":false,"torch_dtype":"float16","use_cache":true,"vocab_size":32000}"#;

fn shears(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shears"))
        .args(args)
        .output()
        .unwrap()
}

fn plan_json(source: &Path, target: &Path) -> Value {
    let o = shears(&[
        "plan",
        "--source",
        source.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn sheared_llama_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("config.json");
    std::fs::write(&src, LLAMA2_7B).unwrap();
    for (toml, prunable, total, sparsity, modules) in [
        (
            "layers = 32\nhidden = 2560\nheads = 20\nintermediate = 6912\n",
            2_537_553_920u64,
            2_701_560_320u64,
            0.60816,
            vec!["hidden", "intermediate", "kv_heads"],
        ),
        (
            "layers = 24\nhidden = 2048\nheads = 16\nintermediate = 5504\n",
            1_214_251_008,
            1_345_423_360,
            0.8125,
            vec!["hidden", "layer", "intermediate", "kv_heads"],
        ),
    ] {
        let t = tmp.path().join("target.toml");
        std::fs::write(&t, toml).unwrap();
        let v = plan_json(&src, &t);
        assert_eq!(v["source"]["prunable_params"], 6_476_005_376u64);
        assert_eq!(v["source"]["total_params"], 6_738_415_616u64);
        assert_eq!(v["target"]["prunable_params"], prunable);
        assert_eq!(v["target"]["total_params"], total);
        assert!((v["target_sparsity"].as_f64().unwrap() - sparsity).abs() < 5e-6);
        let names: Vec<&str> = v["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["module"].as_str().unwrap())
            .collect();
        assert_eq!(names, modules);
        // Without a plan or flags: a cuda device, where bf16-mixed is the default.
        let mem = &v["memory"];
        assert_eq!(mem["settings"]["precision"], "bf16-mixed");
        assert_eq!(mem["weights"], 6_738_415_616u64 * 2);
        assert_eq!(mem["master_weights"], 6_738_415_616u64 * 4);
        assert_eq!(mem["fits"], Value::Null);
    }
    // The human-readable report says the same.
    let t = tmp.path().join("target.toml");
    let o = shears(&[
        "plan",
        "--source",
        src.to_str().unwrap(),
        "--target",
        t.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("1,214,251,008") && text.contains("0.81250"),
        "{text}"
    );
}

#[test]
fn gqa_plan_warns_about_alignment() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("config.json");
    std::fs::write(
        &src,
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,"intermediate_size":1536,
        "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"head_dim":64,
        "rms_norm_eps":1e-5,"tie_word_embeddings":true}"#,
    )
    .unwrap();
    let t = tmp.path().join("t.toml");
    std::fs::write(
        &t,
        "[target]\nlayers = 20\nhidden = 400\nheads = 6\nkv_heads = 3\nintermediate = 1000\n",
    )
    .unwrap();
    let v = plan_json(&src, &t);
    let modules: Vec<&str> = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["module"].as_str().unwrap())
        .collect();
    assert_eq!(modules, ["hidden", "layer", "intermediate", "query_heads"]);
    let q = &v["modules"][3];
    assert_eq!(q["mask_shape"], serde_json::json!([90, 3]));
    assert_eq!(q["kept_per_row"], 2);
    let hidden = &v["alignment"][0];
    assert_eq!(hidden["multiple_of_64"], false);
    assert_eq!(hidden["nearest_multiple_of_64"], 384);
    // 20 x (2*384*64*(6+3) + 3*384*1000) + 49152*384 + 41*384
    assert_eq!(
        hidden["total_params_at_nearest"],
        20u64 * (2 * 384 * 64 * 9 + 3 * 384 * 1000) + 49152 * 384 + 41 * 384
    );
    let o = shears(&[
        "plan",
        "--source",
        src.to_str().unwrap(),
        "--target",
        t.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("WARNING: not a multiple of 64"));
}

#[test]
fn bad_targets_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("config.json");
    std::fs::write(&src, LLAMA2_7B).unwrap();
    for (toml, msg) in [
        (
            "layers = 40\nhidden = 2048\nheads = 16\nintermediate = 5504\n",
            "larger than the source",
        ),
        (
            "layers = 0\nhidden = 2048\nheads = 16\nintermediate = 5504\n",
            "is 0",
        ),
        (
            "layers = 24\nhidden = 2048\nheads = 16\nkv_heads = 3\nintermediate = 5504\n",
            "not a multiple",
        ),
        (
            "layers = 24\nhidden = 2000\nheads = 16\nintermediate = 5504\n",
            "num_attention_heads x head_dim",
        ),
        (
            "layers = 24\nheads = 16\nintermediate = 5504\n",
            "missing field `hidden_size`",
        ),
    ] {
        let t = tmp.path().join("bad.toml");
        std::fs::write(&t, toml).unwrap();
        let o = shears(&[
            "plan",
            "--source",
            src.to_str().unwrap(),
            "--target",
            t.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"));
        assert!(err.contains(msg), "{toml}: {err}");
    }
    // A module switched off although its dimension changes (upstream issue #74).
    let t = tmp.path().join("t.toml");
    std::fs::write(
        &t,
        "layers = 24\nhidden = 2048\nheads = 16\nintermediate = 5504\n",
    )
    .unwrap();
    let o = shears(&[
        "plan",
        "--source",
        src.to_str().unwrap(),
        "--target",
        t.to_str().unwrap(),
        "--modules",
        "kv_heads,intermediate",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("hidden, layer") && err.contains("not pruned"),
        "{err}"
    );
}

/// The README's defaults block is `shears defaults prune`'s output, so the defaults are written
/// in one place (the settings' `Default` impls). `SHEARS_BLESS=1` rewrites the block.
#[test]
fn readme_shows_the_generated_defaults() {
    const START: &str = "<!-- shears defaults prune -->\n```toml\n";
    const END: &str = "```\n<!-- end shears defaults prune -->";
    let o = shears(&["defaults", "prune"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8(o.stdout).unwrap();
    assert!(printed.contains("[optim]\n") && printed.contains("\nlr = 0.0001\n"));
    assert!(printed.contains("# warmup_steps: default 10% of run.steps"));
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let a = readme.find(START).expect("README has the defaults block") + START.len();
    let b = a + readme[a..].find(END).expect("the block ends");
    if std::env::var_os("SHEARS_BLESS").is_some() {
        let new = format!("{}{}{}", &readme[..a], printed, &readme[b..]);
        std::fs::write(&readme_path, new).unwrap();
        return;
    }
    assert_eq!(
        &readme[a..b],
        printed,
        "README's defaults block is stale: rerun with SHEARS_BLESS=1"
    );
    let train = shears(&["defaults", "train"]);
    let train = String::from_utf8(train.stdout).unwrap();
    assert!(train.contains("# warmup_steps: default 3% of run.steps"));
    assert!(!train.contains("[pruning]"));
    let bad = shears(&["defaults", "finalize"]);
    assert!(!bad.status.success());
}

/// The recipes in `examples/`: 7B → Sheared-LLaMA-2.7B and Llama-3.1-8B → 3B (GQA) fit one
/// 141 GB device with the settings the README states, and do not fit 80 GB without
/// checkpointing (nor in f32).
#[test]
fn real_scale_recipes_fit_one_h200() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let run = |dir: &str, plan: &str, extra: &[&str]| -> Value {
        let src = root.join(dir).join("config.json");
        let plan = root.join(dir).join(plan);
        let mut args = vec![
            "plan",
            "--config",
            plan.to_str().unwrap(),
            "--source",
            src.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = shears(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    for (dir, plan, total_params) in [
        ("llama-2-7b", "prune-sheared-2.7b.toml", 6_738_415_616u64),
        ("llama-3.1-8b", "prune-3b.toml", 8_030_261_248),
    ] {
        // The run plans as written: 32 x 4096 on cuda, bf16-mixed, bf16 moments, layers.
        let v = run(dir, plan, &["--device-memory", "141GB"]);
        assert_eq!(v["source"]["total_params"], total_params, "{dir}");
        let m = &v["memory"];
        let s = &m["settings"];
        assert_eq!(
            (&s["batch"], &s["seq_len"], &s["micro_batch"]),
            (&json!(32), &json!(4096), &json!(1)),
            "{dir}: {s}"
        );
        assert_eq!(
            (
                &s["precision"],
                &s["optimizer_state"],
                &s["checkpointing"],
                &s["device"]
            ),
            (
                &json!("bf16-mixed"),
                &json!("bf16"),
                &json!("layers"),
                &json!("cuda")
            ),
            "{dir}: {s}"
        );
        assert_eq!(m["fits"], true, "{dir}: {m}");
        assert!(m["total"].as_u64().unwrap() <= 141_000_000_000);
        // Continued pre-training of the target distilling from the source: the teacher's
        // bf16 weights (no gradients, no optimizer state) and its rows on top of plain
        // training; it fits the same device.
        let (plain, kd) = (&v["train_memory"], &v["distill_memory"]);
        let teacher = kd["teacher"].as_u64().unwrap();
        assert!(
            teacher >= total_params * 2 && teacher < total_params * 2 + (4 << 30),
            "{dir}: {teacher}"
        );
        assert_eq!(plain["teacher"], 0);
        assert_eq!(
            kd["total"].as_u64().unwrap(),
            plain["total"].as_u64().unwrap() + teacher,
            "{dir}"
        );
        assert_eq!(kd["fits"], true, "{dir}: {kd}");
        assert_eq!(m["master_weights"], total_params * 4);
        assert_eq!(m["gradient_accumulator"], total_params * 4);
        assert_eq!(m["optimizer_state"], total_params * 4);
        // Layer checkpointing holds one segment's bf16 weight copies and gradients.
        assert!(
            m["weights"].as_u64().unwrap() * 10 < total_params * 2,
            "{dir}"
        );
        assert!(m["max_micro_batch"].as_u64().unwrap() >= 1);
        // Evaluation is its own phase: the plans score one sequence at a time, because
        // evaluating 16 sequences of 4096 at once does not fit.
        assert_eq!(s["eval_batch"], 1, "{dir}: {s}");
        let (act, step, eval) = (
            &m["activations"],
            &m["step_activations"],
            &m["eval_activations"],
        );
        assert_eq!(act.as_u64(), step.as_u64().max(eval.as_u64()), "{dir}: {m}");
        let v = run(
            dir,
            plan,
            &["--eval-batch", "16", "--device-memory", "141GB"],
        );
        assert_eq!(v["memory"]["fits"], false, "{dir}: {}", v["memory"]);
        // Per-token terms scale with the batch; the LM-head chunk does not.
        let (e16, e1) = (
            v["memory"]["eval_activations"].as_u64().unwrap(),
            m["eval_activations"].as_u64().unwrap(),
        );
        assert!(e16 > 15 * e1 && e16 < 16 * e1, "{dir}: {e16} vs {e1}");
        // 80 GB without checkpointing: no.
        let v = run(
            dir,
            plan,
            &["--checkpointing", "none", "--device-memory", "80GB"],
        );
        assert_eq!(v["memory"]["fits"], false, "{dir}");
        assert_eq!(v["memory"]["max_micro_batch"], Value::Null, "{dir}");
        // All f32 on 141 GB: no either.
        let v = run(
            dir,
            plan,
            &[
                "--precision",
                "f32",
                "--optimizer-state",
                "f32",
                "--checkpointing",
                "none",
                "--device-memory",
                "141GB",
            ],
        );
        assert_eq!(v["memory"]["fits"], false, "{dir}");
    }
    // The target-file form gives the same numbers as the plan.
    let recipe = [
        "--batch",
        "32",
        "--seq-len",
        "4096",
        "--micro-batch",
        "1",
        "--precision",
        "bf16-mixed",
        "--optimizer-state",
        "bf16",
        "--checkpointing",
        "layers",
        "--eval-batch",
        "1",
        "--device-memory",
        "141GB",
    ];
    let src = root.join("llama-2-7b/config.json");
    let tgt = root.join("llama-2-7b/target-sheared-2.7b.toml");
    let (src, tgt) = (src.to_str().unwrap(), tgt.to_str().unwrap());
    let mut args = vec!["plan", "--source", src, "--target", tgt, "--json"];
    args.extend_from_slice(&recipe);
    let o = shears(&args);
    let by_flags: Value = serde_json::from_slice(&o.stdout).unwrap();
    let by_plan = run(
        "llama-2-7b",
        "prune-sheared-2.7b.toml",
        &["--device-memory", "141GB"],
    );
    assert_eq!(by_flags["memory"], by_plan["memory"]);
    // Data parallel: the memory is per device (full replicas), the report says how the global
    // batch splits, and the largest micro-batch leaves every device at least one.
    let by_devices = run(
        "llama-2-7b",
        "prune-sheared-2.7b.toml",
        &["--device-memory", "141GB", "--devices", "8"],
    );
    let (m8, m1) = (&by_devices["memory"], &by_plan["memory"]);
    assert_eq!(m8["total"], m1["total"]);
    assert_eq!(m8["settings"]["devices"], 8);
    assert_eq!(m8["max_micro_batch"], 4, "{m8}");
    let mut args = vec!["plan", "--source", src, "--target", tgt, "--devices", "4"];
    args.extend_from_slice(&recipe);
    let text = String::from_utf8_lossy(&shears(&args).stdout).to_string();
    assert!(
        text.contains("on each of 4 devices (full replicas): global batch 32 = 32 micro-batches of 1 per step, 8 per device"),
        "{text}"
    );
    // The text report says so, and bad settings are refused with the setting named.
    let mut args = vec!["plan", "--source", src, "--target", tgt];
    args.extend_from_slice(&recipe);
    let o = shears(&args);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("fits a device of") && text.contains("largest micro-batch"),
        "{text}"
    );
    for (bad, what) in [
        (vec!["--device-memory", "141"], "no unit"),
        (vec!["--precision", "fp8"], "fp8"),
        (vec!["--batch", "8", "--micro-batch", "3"], "must divide"),
        (vec!["--checkpointing", "some"], "some"),
        (
            vec!["--batch", "8", "--micro-batch", "2", "--devices", "8"],
            "8 device(s) need at least one micro-batch each",
        ),
    ] {
        let mut args = vec!["plan", "--source", src, "--target", tgt];
        args.extend_from_slice(&bad);
        let o = shears(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(what), "{bad:?}: {err}");
    }
}

/// Parameters of a decoder counted from its widths, independently of `Dims`: embeddings (and an
/// untied head), per layer the projections, q/k/v biases, q/k norms (`[head_dim]` each) and
/// `norms` gains over the hidden dimension, and the final norm.
#[allow(clippy::too_many_arguments)]
fn closed_form(
    (v, d, l, h, kv, hd, i): (u64, u64, u64, u64, u64, u64, u64),
    tied: bool,
    bias: bool,
    qk_norm: bool,
    norms: u64,
) -> u64 {
    let per_layer = d * hd * (2 * h + 2 * kv)
        + 3 * d * i
        + norms * d
        + if bias { (h + 2 * kv) * hd } else { 0 }
        + if qk_norm { 2 * hd } else { 0 };
    v * d * if tied { 1 } else { 2 } + l * per_layer + d
}

/// The family recipes in `examples/`: Qwen2.5-7B → Qwen2.5-3B's widths, Qwen3-8B → Qwen3-4B's,
/// Gemma 3 4B (its multimodal config, read as the text decoder) → a 1B shape. `shears plan`
/// counts every parameter (biases, q/k norms, Gemma's four norms) as the published checkpoints
/// have them (Qwen2.5-7B 7,615,616,512; Qwen3-8B 8,190,735,360; Gemma 3 4B's decoder 3.88B of
/// the 4.3B with its vision tower), and each run plan fits one 141 GB device, KD included.
#[test]
fn family_recipes_fit_one_h200() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for (dir, plan, source, target) in [
        (
            "qwen2.5-7b",
            "prune-3b.toml",
            closed_form((152064, 3584, 28, 28, 4, 128, 18944), false, true, false, 2),
            closed_form((152064, 2048, 28, 16, 4, 128, 11008), false, true, false, 2),
        ),
        (
            "qwen3-8b",
            "prune-4b.toml",
            closed_form((151936, 4096, 36, 32, 8, 128, 12288), false, false, true, 2),
            closed_form((151936, 2560, 36, 32, 8, 128, 9728), false, false, true, 2),
        ),
        (
            "gemma-3-4b",
            "prune-1b.toml",
            closed_form((262208, 2560, 34, 8, 4, 256, 10240), true, false, true, 4),
            closed_form((262208, 1152, 26, 4, 2, 256, 6912), true, false, true, 4),
        ),
    ] {
        let src = root.join(dir).join("config.json");
        let plan = root.join(dir).join(plan);
        let o = shears(&[
            "plan",
            "--config",
            plan.to_str().unwrap(),
            "--source",
            src.to_str().unwrap(),
            "--device-memory",
            "141GB",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["source"]["total_params"], source, "{dir}");
        assert_eq!(v["target"]["total_params"], target, "{dir}");
        for m in ["memory", "train_memory", "distill_memory"] {
            assert_eq!(v[m]["fits"], true, "{dir} {m}: {}", v[m]);
        }
        assert!(v["memory"]["total"].as_u64().unwrap() <= 141_000_000_000);
    }
    assert_eq!(
        closed_form((152064, 3584, 28, 28, 4, 128, 18944), false, true, false, 2),
        7_615_616_512
    );
    assert_eq!(
        closed_form((151936, 4096, 36, 32, 8, 128, 12288), false, false, true, 2),
        8_190_735_360
    );
}
