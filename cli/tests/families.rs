//! Every family through the whole pipeline, as a user runs it: `shears run` prunes (all five mask
//! types, two data-parallel ranks, layer checkpointing), finalizes, trains with the source as
//! KD teacher in bf16-mixed, evaluates and exports the tiny model of each family
//! (`tests/fixtures/families`); then `info`, zero-shot `eval` and a GGUF export of the result,
//! which reads back as the same family and scores as the HF export does.

use std::path::Path;

use serde_json::Value;
use shears_tests::families;
use shears_tests::runs::{assert_refused, corpus, ok, shears, TINY_TARGET};

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
    // Training (with its teacher) lowered the pruned model's mean loss over the domains (these
    // formula-weight models are far from the data, and the teacher pulls towards its own
    // distribution, so a single domain may not move in 6 steps).
    let mean_log = |m: &str| -> f64 {
        let ppl = s[m]["per_domain_ppl"].as_object().unwrap();
        ppl.values().map(|v| v.as_f64().unwrap().ln()).sum::<f64>() / ppl.len() as f64
    };
    let (before, after) = (mean_log("pruned"), mean_log("trained"));
    assert!(
        after < before,
        "{family}: mean loss {after} after, {before} before"
    );
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

/// The tiny model of `family` as an HF directory `dir/name`, its `config.json` edited by `edit`
/// and its weights by `weights`.
fn edited(
    dir: &Path,
    name: &str,
    family: &str,
    edit: impl FnOnce(&mut Value),
    weights: impl FnOnce(&mut shears_core::WeightMap),
) -> std::path::PathBuf {
    let p = dir.join(name);
    let mut files = families::model(family);
    weights(&mut files.weights);
    files.write_hf_dir(&p, None, false).unwrap();
    let mut cfg = read(&p.join("config.json"));
    edit(&mut cfg);
    std::fs::write(p.join("config.json"), cfg.to_string()).unwrap();
    if name.starts_with("multimodal") {
        // The weights under the multimodal checkpoint's names, beside a vision tower's.
        let mut w: shears_core::WeightMap = files
            .weights
            .iter()
            .map(|(k, v)| (k.replacen("model.", "model.language_model.", 1), v.clone()))
            .collect();
        if name.ends_with("vision-only") {
            w.retain(|k, _| !k.starts_with("model.language_model."));
        }
        w.insert(
            "model.vision_tower.vision_model.post_layernorm.weight".into(),
            shears_core::HostTensor::f32(vec![4], vec![1.0; 4]),
        );
        w.insert(
            "model.multi_modal_projector.mm_soft_emb_norm.weight".into(),
            shears_core::HostTensor::f32(vec![4], vec![1.0; 4]),
        );
        if name.ends_with("sharded") {
            // Two shards and an index, as the published checkpoints ship.
            std::fs::remove_file(p.join("model.safetensors")).unwrap();
            let mut map = serde_json::Map::new();
            let names: Vec<String> = w.keys().cloned().collect();
            for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
                let file = format!("model-0000{}-of-00002.safetensors", i + 1);
                let shard: shears_core::WeightMap =
                    part.iter().map(|k| (k.clone(), w[k].clone())).collect();
                shears_core::formats::safetensors::write(
                    p.join(&file),
                    &shard,
                    &Default::default(),
                )
                .unwrap();
                for k in part {
                    map.insert(k.clone(), Value::from(file.clone()));
                }
            }
            let index = serde_json::json!({"metadata": {}, "weight_map": map});
            std::fs::write(p.join("model.safetensors.index.json"), index.to_string()).unwrap();
        } else {
            shears_core::formats::safetensors::write(
                p.join("model.safetensors"),
                &w,
                &Default::default(),
            )
            .unwrap();
        }
    }
    p
}

fn score(model: &Path) -> std::process::Output {
    shears(
        BIN,
        &[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--text",
            "one two three four",
        ],
    )
}

/// A Gemma 3 multimodal checkpoint (`Gemma3ForConditionalGeneration`: the decoder's config in
/// `text_config`, its weights under `model.language_model.`, a vision tower beside them) is
/// read as its text decoder and scores as the text-only model does.
#[test]
fn a_gemma3_multimodal_checkpoint_is_read_as_its_text_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let multimodal = |c: &mut Value| {
        let text = c.clone();
        *c = serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": text, "vision_config": {"hidden_size": 4}, "eos_token_id": [1, 106],
        });
    };
    let plain = edited(tmp.path(), "plain", "gemma3", |_| {}, |_| {});
    let mm = edited(tmp.path(), "multimodal", "gemma3", multimodal, |_| {});
    let (a, b) = (mean_nll(&plain), mean_nll(&mm));
    assert_eq!(a, b);
    let sharded = edited(
        tmp.path(),
        "multimodal-sharded",
        "gemma3",
        multimodal,
        |_| {},
    );
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert_eq!(mean_nll(&sharded), a);
    // Exported, it is a text model (Gemma3ForCausalLM) with the outer config's token ids.
    let out = tmp.path().join("out");
    ok(&shears(
        BIN,
        &[
            "export",
            mm.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    ));
    let cfg = read(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(cfg["eos_token_id"], serde_json::json!([1, 106]));
    assert_eq!(mean_nll(&out), a);
    let only = edited(
        tmp.path(),
        "multimodal-vision-only",
        "gemma3",
        multimodal,
        |_| {},
    );
    assert_refused(
        &score(&only),
        &["model.safetensors", "without its text weights"],
    );
}

/// Family configs Shears cannot run as transformers does, and weights that disagree with their
/// family: each is refused naming the file and the problem.
#[test]
fn family_configs_and_weights_that_disagree_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let set = |k: &'static str, v: Value| move |c: &mut Value| c[k] = v;
    let cases: Vec<(std::path::PathBuf, Vec<&str>)> = vec![
        (
            edited(
                d,
                "phi",
                "qwen2",
                set("architectures", serde_json::json!(["Phi3ForCausalLM"])),
                |_| {},
            ),
            vec![
                "config.json",
                "Phi3ForCausalLM",
                "Qwen3ForCausalLM, Gemma3ForCausalLM",
            ],
        ),
        (
            edited(
                d,
                "types",
                "gemma3",
                set("layer_types", serde_json::json!(["full_attention"])),
                |_| {},
            ),
            vec![
                "config.json",
                "layer_types names 1 layers but num_hidden_layers is 4",
            ],
        ),
        (
            edited(
                d,
                "kind",
                "qwen3-window",
                set(
                    "layer_types",
                    serde_json::json!(["full_attention", "chunked_attention"]),
                ),
                |_| {},
            ),
            vec!["config.json", "layer_types[1]"],
        ),
        (
            edited(
                d,
                "bias",
                "gemma3",
                set("attention_bias", Value::Bool(true)),
                |_| {},
            ),
            vec!["config.json", "attention_bias"],
        ),
        (
            edited(
                d,
                "softcap",
                "gemma3",
                set("final_logit_softcapping", serde_json::json!(30.0)),
                |_| {},
            ),
            vec!["config.json", "final_logit_softcapping"],
        ),
        (
            edited(
                d,
                "act",
                "gemma3",
                set("hidden_activation", serde_json::json!("silu")),
                |_| {},
            ),
            vec!["config.json", "hidden_act"],
        ),
        // Qwen2 without its biases; Qwen3 with biases its config does not declare.
        (
            edited(
                d,
                "nobias",
                "qwen2",
                |_| {},
                |w| w.retain(|k, _| !k.ends_with("_proj.bias")),
            ),
            vec!["model.safetensors", "self_attn.q_proj.bias"],
        ),
        (
            edited(
                d,
                "extrabias",
                "qwen3",
                |_| {},
                |w| {
                    let b = families::model("qwen2").weights
                        ["model.layers.0.self_attn.k_proj.bias"]
                        .clone();
                    w.insert("model.layers.0.self_attn.k_proj.bias".into(), b);
                },
            ),
            vec!["model.safetensors", "k_proj.bias"],
        ),
        // Qwen3 weights under a Gemma 3 config: its feedforward norms are missing.
        (
            edited(
                d,
                "crossed",
                "qwen3",
                |c| {
                    let g = families::fixture("gemma3")["config"].clone();
                    let keep = [
                        "hidden_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "head_dim",
                        "intermediate_size",
                        "vocab_size",
                        "tie_word_embeddings",
                    ];
                    let mut n = g.clone();
                    for k in keep {
                        n[k] = c[k].clone();
                    }
                    n["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]);
                    *c = n;
                },
                |_| {},
            ),
            vec!["model.safetensors", "pre_feedforward_layernorm"],
        ),
    ];
    for (model, needles) in cases {
        let before = shears_tests::runs::snapshot(&model);
        eprintln!("{}", model.display());
        assert_refused(&score(&model), &needles);
        assert_eq!(shears_tests::runs::snapshot(&model), before);
    }
}

#[test]
fn qwen3_runs_the_pipeline() {
    pipeline("qwen3", "Qwen3ForCausalLM");
}

#[test]
fn gemma3_untied_runs_the_pipeline() {
    pipeline("gemma3-untied", "Gemma3ForCausalLM");
}
