//! Inputs as a hostile or careless user writes them, one test per kind of damage: each must be
//! refused with exit status 1, a message naming the file or setting and the problem, no panic,
//! no abort (tests whose point is memory run under an address-space limit), and no change to
//! any input.

use std::path::{Path, PathBuf};

use shears_tests::runs::{
    assert_refused, setup, shears, shears_limited, snapshot, tiny_model, TINY_TARGET,
};
use shears_tests::{tiny_gguf_model, write_gguf, GgufTensor, Meta};

const BIN: &str = env!("CARGO_BIN_EXE_shears");

fn run(args: &[&str]) -> std::process::Output {
    shears(BIN, args)
}

/// `shears prune --config PLAN --out OUT`.
fn prune(plan: &Path, out: &Path) -> std::process::Output {
    run(&[
        "prune",
        "--config",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The tiny GGUF with `edit` applied to its metadata and tensors, at `dir/name`.
fn gguf_with(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<(&'static str, Meta)>, &mut Vec<GgufTensor>),
) -> PathBuf {
    let (mut meta, mut tensors) = tiny_gguf_model();
    edit(&mut meta, &mut tensors);
    let p = dir.join(name);
    write_gguf(&p, &meta, &tensors, None);
    p
}

fn set_meta(meta: &mut [(&'static str, Meta)], key: &str, v: Meta) {
    meta.iter_mut().find(|(k, _)| *k == key).unwrap().1 = v;
}

/// An HF directory imported from the tiny GGUF.
fn tiny_hf(dir: &Path) -> PathBuf {
    let src = tiny_model(dir);
    let out = dir.join("hf");
    ok(&run(&[
        "import",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    out
}

fn edit_config(hf: &Path, key: &str, v: serde_json::Value) {
    let p = hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg[key] = v;
    std::fs::write(&p, cfg.to_string()).unwrap();
}

/// Item 1: counts in metadata are checked against the tensors before anything is sized from
/// them, in GGUF metadata and in config.json, under a 2 GiB address-space limit.
#[test]
fn metadata_that_disagrees_with_the_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let huge = gguf_with(tmp.path(), "huge-layers.gguf", |m, _| {
        set_meta(m, "llama.block_count", Meta::U32(1 << 31))
    });
    let o = shears_limited(BIN, 2048, &["info", huge.to_str().unwrap()]);
    assert_refused(
        &o,
        &[
            "huge-layers.gguf",
            "num_hidden_layers = 2147483648 is beyond",
        ],
    );
    let three = gguf_with(tmp.path(), "three-layers.gguf", |m, _| {
        set_meta(m, "llama.block_count", Meta::U32(3))
    });
    let o = shears_limited(BIN, 2048, &["info", three.to_str().unwrap()]);
    assert_refused(
        &o,
        &[
            "three-layers.gguf",
            "num_hidden_layers = 3",
            "weights hold 2 layers",
        ],
    );

    let hf = tiny_hf(tmp.path());
    for (key, value, says) in [
        ("num_hidden_layers", 1_000_000_000u64, "is beyond"),
        ("num_hidden_layers", 3, "weights hold 2 layers"),
        ("hidden_size", 1 << 40, "is beyond"),
        ("vocab_size", 1 << 40, "is beyond"),
        ("intermediate_size", u64::MAX, "is beyond"),
    ] {
        let dir = tmp.path().join(format!("hf-{key}-{value}"));
        std::fs::create_dir(&dir).unwrap();
        for (p, bytes) in snapshot(&hf) {
            std::fs::write(dir.join(p.file_name().unwrap()), bytes).unwrap();
        }
        edit_config(&dir, key, value.into());
        let o = shears_limited(BIN, 2048, &["info", dir.to_str().unwrap()]);
        assert_refused(&o, &["config.json", key, says]);
    }
}

/// Q4_1 blocks (f16 scale and minimum, 32 four-bit values) for a `[rows, 32]` tensor.
fn q4_1(rows: usize) -> Vec<u8> {
    let mut out = vec![];
    for r in 0..rows {
        out.extend(0x211fu16.to_le_bytes()); // f16 0.01
        out.extend(0xad1fu16.to_le_bytes()); // f16 -0.08
        out.extend((0..16).map(|i| ((r + i) % 251) as u8));
    }
    out
}

/// Item 2: tensor data is validated the way llama.cpp's loader does it (sizes from type and
/// shape, packed offsets, unique names and keys), and safetensors the way the reference does
/// (contiguous offsets, unique keys, no trailing bytes, shards inside the model directory).
#[test]
fn tensor_data_is_validated_like_the_reference_loaders() {
    let tmp = tempfile::tempdir().unwrap();
    // A valid Q4_1 tensor loads ...
    let quant = |t: &mut Vec<GgufTensor>, type_id: u32| {
        let g = t
            .iter_mut()
            .find(|t| t.name == "blk.0.ffn_gate.weight")
            .unwrap();
        g.type_id = type_id;
        g.data = q4_1(64);
    };
    let q41 = gguf_with(tmp.path(), "q4_1.gguf", |_, t| quant(t, 3));
    ok(&run(&["info", q41.to_str().unwrap()]));
    // ... and relabelled as Q8_0 (34-byte blocks over 20-byte ones) it no longer fits.
    let q80 = gguf_with(tmp.path(), "relabelled.gguf", |_, t| quant(t, 8));
    let o = run(&[
        "score",
        "--model",
        q80.to_str().unwrap(),
        "--text",
        "the cat",
    ]);
    assert_refused(
        &o,
        &[
            "relabelled.gguf",
            "blk.0.ffn_up.weight",
            "overlapping or misplaced",
        ],
    );
    let twice = gguf_with(tmp.path(), "twice.gguf", |_, t| {
        let n = t
            .iter()
            .position(|t| t.name == "blk.1.ffn_up.weight")
            .unwrap();
        t[n].name = "blk.0.ffn_up.weight".into();
    });
    let o = run(&["info", twice.to_str().unwrap()]);
    assert_refused(&o, &["twice.gguf", "blk.0.ffn_up.weight", "appears twice"]);
    let key_twice = gguf_with(tmp.path(), "key-twice.gguf", |m, _| {
        m.push(("llama.block_count", Meta::U32(2)))
    });
    let o = run(&["info", key_twice.to_str().unwrap()]);
    assert_refused(
        &o,
        &["key-twice.gguf", "llama.block_count", "appears twice"],
    );
    // A shape whose byte size overflows 64 bits.
    let vast = gguf_with(tmp.path(), "vast.gguf", |_, t| {
        let n = t
            .iter()
            .position(|t| t.name == "output_norm.weight")
            .unwrap();
        t[n].dims = vec![1 << 62, 2];
    });
    let o = run(&["info", vast.to_str().unwrap()]);
    assert_refused(&o, &["vast.gguf", "output_norm.weight", "overflows"]);

    // safetensors: a valid file, then each inconsistency.
    let hf = tiny_hf(tmp.path());
    let st = hf.join("model.safetensors");
    let valid = std::fs::read(&st).unwrap();
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(valid[8..8 + header_len].to_vec()).unwrap();
    let data = valid[8 + header_len..].to_vec();
    let with_header = |h: &str, data: &[u8]| {
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend(h.as_bytes());
        b.extend(data);
        b
    };
    let mut trailing = valid.clone();
    trailing.extend([0u8; 16]);
    let first_key = "\"lm_head.weight\"";
    assert!(!header.contains(first_key), "the tiny model ties its head");
    let norm: serde_json::Value = serde_json::from_str(&header).unwrap();
    let norm_entry = norm["model.norm.weight"].to_string();
    // The same key twice (JSON maps would silently keep the last).
    let dup = header.replacen('{', &format!("{{\"model.norm.weight\":{norm_entry},"), 1);
    // A field twice inside one entry.
    let dup_field = header.replacen(
        "\"model.norm.weight\":{",
        "\"model.norm.weight\":{\"dtype\":\"F16\",",
        1,
    );
    assert_ne!(dup_field, header);
    // Two tensors over the same bytes: the final norm's offsets copied onto the first layer's.
    let layer0: serde_json::Value = norm["model.layers.0.input_layernorm.weight"].clone();
    let overlap = header.replacen(
        &format!(
            "\"model.layers.0.input_layernorm.weight\":{}",
            serde_json::to_string(&layer0).unwrap()
        ),
        &format!("\"model.layers.0.input_layernorm.weight\":{norm_entry}"),
        1,
    );
    assert_ne!(overlap, header);
    for (bytes, says) in [
        (trailing, "trailing bytes"),
        (with_header(&dup, &data), "appears twice"),
        (with_header(&dup_field, &data), "duplicate field `dtype`"),
        (
            with_header(&overlap, &data),
            "do not start where the tensors before it end",
        ),
    ] {
        std::fs::write(&st, bytes).unwrap();
        let o = run(&["info", hf.to_str().unwrap()]);
        assert_refused(&o, &["model.safetensors", says]);
    }
    // A sharded index that points outside the model directory.
    std::fs::write(&st, &valid).unwrap();
    let outside = tmp.path().join("outside.safetensors");
    std::fs::rename(&st, &outside).unwrap();
    let names: serde_json::Value = serde_json::from_str(&header).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = names
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .map(|k| (k.clone(), "../outside.safetensors".into()))
        .collect();
    let index = hf.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let o = run(&["info", hf.to_str().unwrap()]);
    assert_refused(
        &o,
        &[
            "model.safetensors.index.json",
            "points outside the model directory",
        ],
    );
}

fn prune_plan(dir: &Path, name: &str, model: &Path, data: &Path, extra: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "model = \"{}\"\ndata = \"{}\"\n{TINY_TARGET}\n{extra}\n",
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    p
}

/// Item 6: data tokenized with another tokenizer than the model's is refused (naming the data
/// and the override) unless the user passes --allow-tokenizer-mismatch.
#[test]
fn data_from_another_tokenizer_is_refused_without_the_override() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, data) = setup(BIN, tmp.path());
    // Same vocabulary, one merge fewer: another tokenizer.
    let other = gguf_with(tmp.path(), "other-merges.gguf", |m, _| {
        set_meta(
            m,
            "tokenizer.ggml.merges",
            Meta::StrArray(vec!["t h".into(), "th e".into()]),
        )
    });
    let plan = prune_plan(
        tmp.path(),
        "p.toml",
        &other,
        &data,
        "[run]\nsteps = 1\nbatch_size = 2\n",
    );
    let out = tmp.path().join("run");
    let args = [
        "prune",
        "--config",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let o = run(&args);
    assert_refused(
        &o,
        &[
            data.to_str().unwrap(),
            "another tokenizer",
            "--allow-tokenizer-mismatch",
        ],
    );
    assert!(!out.exists(), "a run directory was created");
    let mut with = args.to_vec();
    with.push("--allow-tokenizer-mismatch");
    let o = run(&with);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("allowed by --allow-tokenizer-mismatch"));
}

/// Items 9 and 4: a run goes only into a new, empty or run directory (never into the data it
/// reads, never appended to something else), and a shard changed after prepare is an error
/// naming the shard, not an out-of-range lookup.
#[test]
fn runs_never_write_into_inputs_and_tampered_shards_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let plan = prune_plan(
        tmp.path(),
        "p.toml",
        &model,
        &data,
        "[run]\nsteps = 1\nbatch_size = 2\n",
    );
    let before = snapshot(&data);
    let other = tmp.path().join("notes");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("todo.txt"), "mine").unwrap();
    for out in [&data, &other] {
        let o = prune(&plan, out);
        assert_refused(&o, &[out.to_str().unwrap(), "not a run directory"]);
    }
    assert_eq!(snapshot(&data), before, "the data changed");
    assert_eq!(
        std::fs::read_to_string(other.join("todo.txt")).unwrap(),
        "mine"
    );

    // Every id of every train shard set past the vocabulary (sizes unchanged).
    for domain in ["alpha", "beta", "gamma"] {
        for e in std::fs::read_dir(data.join(domain)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("train") {
                let len = std::fs::metadata(e.path()).unwrap().len() as usize;
                std::fs::write(e.path(), vec![0xffu8; len]).unwrap();
            }
        }
    }
    let out = tmp.path().join("run");
    let o = prune(&plan, &out);
    assert_refused(&o, &["train", "token id 65535", "changed after prepare"]);

    // A hand-edited manifest: zero-length sequences, a shard outside the data directory.
    let mpath = data.join("manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    let mut zero = manifest.clone();
    zero["seq_len"] = 0.into();
    let mut outside = manifest.clone();
    outside["domains"]["alpha"]["train_shards"][0]["file"] = "../../etc/passwd".into();
    for (m, says) in [
        (zero, "seq_len 0 is outside"),
        (outside, "not a file inside"),
    ] {
        std::fs::write(&mpath, m.to_string()).unwrap();
        let o = prune(&plan, &out);
        assert_refused(&o, &["manifest.json", says]);
    }
}

/// Items 10 and 11: every number of a plan or a command line has a range, and sizes that would
/// overflow 64 bits are refused with the limit, before any model or data is loaded.
#[test]
fn numbers_out_of_range_are_refused_at_parse_time() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // The data directory does not even exist: the plan's numbers are checked first.
    let data = tmp.path().join("no-data");
    for (extra, setting) in [
        ("[optim]\nlr = nan\n", "optim.lr = NaN"),
        ("[optim]\nlr = -1e-4\n", "optim.lr = -0.0001"),
        ("[optim]\nbeta1 = 1.0\n", "optim.beta1"),
        ("[optim]\nbeta2 = -0.5\n", "optim.beta2"),
        ("[optim]\neps = 0.0\n", "optim.eps"),
        ("[optim]\ngrad_clip = inf\n", "optim.grad_clip"),
        ("[pruning]\nmask_lr = -1.0\n", "pruning.mask_lr"),
        ("[run]\nbatch_size = 0\n", "run.batch_size"),
        ("[run]\neval_batch = 0\n", "run.eval_batch"),
        ("[run]\nbatch_size = 1099511627776\n", "run.batch_size"),
        ("[run]\nseq_len = 1\n", "at least 2 tokens"),
        ("[run]\nsteps = 9223372036854775807\n", "run.steps"),
        (
            "[optim]\nwarmup_steps = 9223372036854775807\n",
            "optim.warmup_steps",
        ),
        (
            "[dbl]\nrule = { rule = \"code\", eta = -1.0 }\n",
            "dbl.rule.eta",
        ),
        (
            "[dbl]\ninitial_weights = { alpha = nan }\n",
            "dbl.initial_weights.alpha",
        ),
    ] {
        let plan = prune_plan(tmp.path(), "bad.toml", &model, &data, extra);
        let out = tmp.path().join("run");
        let o = prune(&plan, &out);
        assert_refused(&o, &["bad.toml", setting]);
        assert!(!out.exists(), "{extra}: a run directory was created");
    }
    // The pipeline names the stage.
    let pipe = tmp.path().join("pipe.toml");
    std::fs::write(
        &pipe,
        format!(
            "model = \"{}\"\nout = \"{}\"\ndata = \"{}\"\n{TINY_TARGET}\n[train.optim]\nlr = nan\n",
            model.display(),
            tmp.path().join("pipe-out").display(),
            data.display()
        ),
    )
    .unwrap();
    let o = run(&["run", pipe.to_str().unwrap()]);
    assert_refused(&o, &["pipe.toml", "train.optim.lr = NaN"]);

    // Model configs: RoPE settings.
    let hf = tiny_hf(tmp.path());
    edit_config(&hf, "rope_theta", (-1.0).into());
    let o = run(&["info", hf.to_str().unwrap()]);
    assert_refused(
        &o,
        &[
            "config.json",
            "rope_theta -1 and rope_parameters.rope_theta 10000 disagree",
        ],
    );
    edit_config(
        &hf,
        "rope_parameters",
        serde_json::json!({"rope_type": "default", "rope_theta": -1.0}),
    );
    let o = run(&["info", hf.to_str().unwrap()]);
    assert_refused(
        &o,
        &["config.json", "rope_theta -1 must be a positive number"],
    );

    // `shears plan`: sizes past 64 bits, empty batches.
    let cfg = tmp.path().join("plan-config.json");
    std::fs::write(
        &cfg,
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":4096,
        "intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,
        "num_key_value_heads":32,"rms_norm_eps":1e-5,"max_position_embeddings":4096}"#,
    )
    .unwrap();
    let target = tmp.path().join("target.toml");
    std::fs::write(
        &target,
        "num_hidden_layers = 24\nhidden_size = 2560\nnum_attention_heads = 20\nnum_key_value_heads = 20\nintermediate_size = 6912\n",
    )
    .unwrap();
    let plan = |batch: &str, seq: &str| {
        run(&[
            "plan",
            "--source",
            cfg.to_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
            "--batch",
            batch,
            "--seq-len",
            seq,
        ])
    };
    ok(&plan("8", "4096"));
    let o = plan("1099511627776", "1099511627776");
    assert_refused(&o, &["batch = 1099511627776 is beyond"]);
    // The largest batch and sequence a run takes still overflow 64 bits of activations.
    let o = plan("16777216", "268435456");
    assert_refused(&o, &["does not fit in 64 bits"]);
    let o = plan("0", "4096");
    assert_refused(&o, &["batch (0)", "at least 1"]);

    // generate: a new-token budget of 2^64 - 1 is refused against the context, not wrapped.
    let o = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "the",
        "--max-new-tokens",
        &u64::MAX.to_string(),
    ]);
    assert_refused(&o, &["max_position_embeddings of 128"]);
}

/// Item 8: chat templates run on an instruction budget and an output cap.
#[test]
fn hostile_chat_templates_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf(tmp.path());
    let tc = hf.join("tokenizer_config.json");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    let generate = || {
        shears_limited(
            BIN,
            4096,
            &[
                "generate",
                "--model",
                hf.to_str().unwrap(),
                "--chat",
                "--prompt",
                "hi",
                "--max-new-tokens",
                "1",
            ],
        )
    };
    for (template, says) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "budget",
        ),
        (
            "{% for i in range(100000) %}{{ 'x' * 99999999 }}{% endfor %}",
            "output grew past",
        ),
        (
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion",
        ),
        // Built in memory, never written: only the renderer's memory limit stops it.
        (
            "{% set x %}{% for i in range(100000) %}{{ 'x' * 99999999 }}{% endfor %}{% endset %}{{ x|length }}",
            "MiB of memory",
        ),
    ] {
        let mut cfg = base.clone();
        cfg["chat_template"] = template.into();
        std::fs::write(&tc, cfg.to_string()).unwrap();
        let o = generate();
        assert_refused(&o, &["chat template failed", says]);
    }
    // A real template still works.
    let mut cfg = base.clone();
    cfg["chat_template"] = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into();
    std::fs::write(&tc, cfg.to_string()).unwrap();
    ok(&generate());
}

/// Item 7: a 50 MB one-line document is tokenized in pieces, under a memory limit the old
/// whole-document tokenization needed about a hundred times more than; and a failing prepare
/// leaves nothing behind.
#[test]
fn huge_documents_prepare_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let words = ["the", "cat", "sat", "on", "then", "mat", "theorem", "42"];
    let mut text = String::with_capacity(50 << 20);
    let mut i = 0usize;
    while text.len() < 50 << 20 {
        text.push_str(words[(i * 7 + i / 3) % words.len()]);
        text.push(' ');
        i += 1;
    }
    let doc = tmp.path().join("huge.jsonl");
    std::fs::write(&doc, serde_json::json!({ "text": text }).to_string()).unwrap();
    drop(text);
    let out = tmp.path().join("data");
    let args = [
        "prepare",
        "--tokenizer",
        model.to_str().unwrap(),
        "--domain",
        &format!("web={}", doc.display()),
        "--seq-len",
        "512",
        "--eval-fraction",
        "0",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = shears_limited(BIN, 2048, &args);
    ok(&o);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert!(
        manifest["domains"]["web"]["train_sequences"]
            .as_u64()
            .unwrap()
            > 10_000
    );

    // A huge document with nowhere to cut: refused, and no partial output remains.
    let solid = tmp.path().join("solid.jsonl");
    std::fs::write(
        &solid,
        serde_json::json!({ "text": "x".repeat(5 << 20) }).to_string(),
    )
    .unwrap();
    let out2 = tmp.path().join("data2");
    let o = shears_limited(
        BIN,
        2048,
        &[
            "prepare",
            "--tokenizer",
            model.to_str().unwrap(),
            "--domain",
            &format!("web={}", solid.display()),
            "--out",
            out2.to_str().unwrap(),
        ],
    );
    assert_refused(&o, &["solid.jsonl", "line 1", "no place to split"]);
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("data2"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Round 3, cause 1: `--force` never replaces an input, even one a model reads through a link
/// from another directory (export HF and GGUF, import, finalize-style directory outputs,
/// prepare with the tokenizer's model), and no output file is written through a link planted
/// where it goes (eval's `--output-path`). A command that always regenerates its output
/// (report, corpus fetch-demo) replaces only an earlier output of its own.
#[cfg(unix)]
#[test]
fn force_never_replaces_an_input_behind_a_link() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf(tmp.path());
    // The model's weights live in another directory and are linked in (as the HF hub cache
    // links its blobs).
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::rename(
        hf.join("model.safetensors"),
        store.join("model.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        store.join("model.safetensors"),
        hf.join("model.safetensors"),
    )
    .unwrap();
    let before = snapshot(&store);
    let hf_s = hf.to_str().unwrap();
    let store_s = store.to_str().unwrap();
    let into_weights = store.join("model.safetensors");
    let cases: Vec<Vec<&str>> = vec![
        vec!["export", hf_s, "--out", store_s, "--force"],
        vec!["import", hf_s, "--out", store_s, "--force"],
        vec![
            "export",
            hf_s,
            "--out",
            into_weights.to_str().unwrap(),
            "--format",
            "gguf",
            "--force",
        ],
        vec![
            "prepare",
            "--tokenizer",
            hf_s,
            "--domain",
            "a=/dev/null",
            "--out",
            store_s,
            "--force",
        ],
    ];
    for args in cases {
        let o = run(&args);
        assert_refused(&o, &["model.safetensors", "never an input"]);
        assert_eq!(
            snapshot(&store),
            before,
            "{args:?} changed the linked weights"
        );
    }
    // A link planted where eval writes its results: refused before anything is evaluated.
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let results = tmp.path().join("results");
    std::fs::create_dir(&results).unwrap();
    std::os::unix::fs::symlink(&victim, results.join("results.json")).unwrap();
    let o = run(&[
        "eval",
        "--model",
        hf_s,
        "--tasks",
        "arc_easy",
        "--output-path",
        results.to_str().unwrap(),
    ]);
    assert_refused(&o, &["results.json", "symbolic link"]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    // Regenerated outputs replace only their own kind.
    let notes = tmp.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), "mine").unwrap();
    let o = run(&["corpus", "fetch-demo", "--out", notes.to_str().unwrap()]);
    assert_refused(&o, &["notes", "not an earlier output"]);
    assert_eq!(
        std::fs::read_to_string(notes.join("todo.txt")).unwrap(),
        "mine"
    );
}

/// Round 3, cause 2: an explicit `--resume` never starts over while checkpoints exist. When
/// none verifies (a garbled manifest, an edited state, a swapped weights file) the run stops,
/// naming each checkpoint and why, and changes nothing; a state file forged consistently
/// (manifest hashes updated) is still refused when read (a step past the plan, a reference loss
/// of -1e308, a NaN domain weight). A run may resume with another `--devices`.
#[test]
fn resume_never_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(BIN, tmp.path());
    let plan = prune_plan(
        tmp.path(),
        "p.toml",
        &model,
        &data,
        "[run]\nsteps = 4\nbatch_size = 2\nmicro_batch = 1\neval_interval = 2\n",
    );
    let run_dir = tmp.path().join("run");
    let out = run_dir.to_str().unwrap();
    let p = plan.to_str().unwrap();
    ok(&run(&[
        "prune",
        "--config",
        p,
        "--out",
        out,
        "--devices",
        "2",
    ]));
    // Resuming the finished 2-rank run on one device is the same run.
    ok(&run(&[
        "prune",
        "--config",
        p,
        "--out",
        out,
        "--resume",
        "--devices",
        "1",
    ]));
    let pristine = snapshot(&run_dir);
    let ckpts = run_dir.join("checkpoints");
    let restore = |snap: &[(PathBuf, Vec<u8>)]| {
        std::fs::remove_dir_all(&run_dir).unwrap();
        for (f, b) in snap {
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, b).unwrap();
        }
    };
    let resume = || run(&["prune", "--config", p, "--out", out, "--resume"]);
    // Every checkpoint damaged, each in another way.
    let names = shears_tests::runs::checkpoints(&run_dir);
    assert_eq!(names, ["step-00000002", "step-00000004"]);
    std::fs::write(ckpts.join(&names[1]).join("MANIFEST.json"), "{garbled").unwrap();
    let state = ckpts.join(&names[0]).join("state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, text.replace("\"step\": 2", "\"step\": 3")).unwrap();
    let damaged = snapshot(&run_dir);
    let err = assert_refused(
        &resume(),
        &[
            "nothing to resume",
            "step-00000004",
            "step-00000002",
            "MANIFEST.json",
            "state.json",
        ],
    );
    assert!(!err.contains("starting from step 0"), "{err}");
    assert_eq!(
        snapshot(&run_dir),
        damaged,
        "a refused resume changed the run"
    );

    // Forged consistently: the manifest's size and hash follow the edit. (Edited as text: the
    // sampler's 128-bit RNG state does not survive a serde_json::Value.)
    let forge = |edit: &dyn Fn(&str) -> String, says: &str| {
        restore(&pristine);
        let dir = ckpts.join(&names[1]);
        let text = std::fs::read_to_string(dir.join("state.json")).unwrap();
        let bytes = edit(&text).into_bytes();
        assert_ne!(bytes, text.as_bytes(), "the edit changed nothing");
        std::fs::write(dir.join("state.json"), &bytes).unwrap();
        let mpath = dir.join("MANIFEST.json");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
        m["files"]["state.json"] =
            serde_json::json!({"bytes": bytes.len(), "sha256": sha256(&bytes)});
        std::fs::write(&mpath, m.to_string()).unwrap();
        let before = snapshot(&run_dir);
        assert_refused(&resume(), &["state.json", says]);
        assert_eq!(snapshot(&run_dir), before);
    };
    forge(
        &|s| s.replacen("\"step\": 4,", "\"step\": 99,", 1),
        "beyond the plan's 4 steps",
    );
    forge(
        &|s| set_number(s, "\"reference_losses\"", "\"alpha\"", "-1e308"),
        "reference loss",
    );
    forge(
        &|s| set_number(s, "\"sampler\"", "\"beta\"", "\"NaN\""),
        "invalid",
    );
    forge(
        &|s| set_number(s, "\"sampler\"", "\"beta\"", "-0.5"),
        "not a non-negative number",
    );
}

/// `text` with the number after the first `key` that follows `section` replaced by `value`.
fn set_number(text: &str, section: &str, key: &str, value: &str) -> String {
    let s = text.find(section).expect("section");
    let k = s + text[s..].find(key).expect("key") + key.len();
    let colon = k + text[k..].find(':').unwrap() + 1;
    let end = colon + text[colon..].find([',', '\n', '}']).unwrap();
    format!("{} {value}{}", &text[..colon], &text[end..])
}

/// sha256 of `bytes` in hex, through the system's `sha256sum`.
fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// Round 3, causes 3 and 5: MMLU requests share their few-shot preamble and context instead of
/// copying them per (question, choice), and what the model cannot see is never tokenized: a
/// folder whose every subject has 1 MB of shots scores in bounded memory (each request held a
/// copy: 57 x 10 x 4 MB). A question with 27 choices, an empty subject under a fractional
/// limit, and a folder with nothing to score are clear errors, never a panic or an empty row.
#[cfg(unix)]
#[test]
fn mmlu_folders_cost_what_the_model_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let m = model.to_str().unwrap();
    let eval = |dir: &Path, limit: &str| {
        shears_limited(
            BIN,
            2048,
            &[
                "eval",
                "--model",
                m,
                "--tasks",
                "mmlu_mc",
                "--mmlu-dir",
                dir.to_str().unwrap(),
                "--limit",
                limit,
                "--json",
            ],
        )
    };
    let big = shears_tests::mmlu_folder(&tmp.path().join("big"), |_, s| match s {
        "dev" => "dev-big.arrow",
        _ => "test.arrow",
    });
    let o = eval(&big, "10");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tasks"]["mmlu_mc"]["n"], 570);
    let many =
        shears_tests::mmlu_folder(&tmp.path().join("many"), |subject, s| match (subject, s) {
            ("virology", "test") => "choices27.arrow",
            (_, "dev") => "dev.arrow",
            _ => "test.arrow",
        });
    assert_refused(&eval(&many, "1"), &["virology/test", "27 choices"]);
    let empty = shears_tests::mmlu_folder(&tmp.path().join("empty"), |_, s| match s {
        "dev" => "dev.arrow",
        _ => "empty.arrow",
    });
    assert_refused(&eval(&empty, "0.5"), &["no question to score"]);
}

/// Round 3, cause 4: two symbolic-link cycles in a source tree (walked as a directory and
/// through a `**` glob) and a FIFO inside it: each real directory is read once, the FIFO
/// passed over, under a 2 GiB address-space limit (the cycles made the walk exponential and
/// the FIFO blocked forever).
#[cfg(unix)]
#[test]
fn prepare_walks_each_directory_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    for (k, (name, _)) in shears_tests::runs::corpus(tmp.path()).iter().enumerate() {
        std::fs::copy(
            tmp.path().join(format!("{name}.jsonl")),
            tree.join(if k == 0 { "a" } else { "a/b" })
                .join(format!("{name}.jsonl")),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink(&tree, tree.join("a/b/loop")).unwrap();
    std::os::unix::fs::symlink(tree.join("a"), tree.join("a/b/again")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(tree.join("a/b/stuck.jsonl"))
        .status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let out = tmp.path().join("data");
    let o = shears_limited(
        BIN,
        2048,
        &[
            "prepare",
            "--tokenizer",
            model.to_str().unwrap(),
            "--domain",
            &format!("walked={}", tree.display()),
            "--domain",
            &format!("globbed={}/**/*.jsonl", tree.display()),
            "--seq-len",
            "32",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    ok(&o);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    for d in ["walked", "globbed"] {
        assert_eq!(
            m["domains"][d]["sources"].as_array().unwrap().len(),
            3,
            "{d}"
        );
    }
}

/// Round 3, causes 6 and 7: numbers a user gives that size a loop or an allocation are
/// bounded before they do (`plan --batch 2^40` hung, `--device-memory 0.5B` was 0 bytes,
/// `--devices 64` built 64 replicas on 2 cores), and settings under which the objective has no
/// gradient are refused (`temperature = 1e-30`, `top_k = 1` trained to exit 0 with kd_loss 0).
#[test]
fn user_numbers_are_bounded_and_no_ops_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let target = shears_tests::runs::write(tmp.path(), "t.toml", TINY_TARGET);
    let plan = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--source",
            model.to_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    assert_refused(
        &plan(&["--batch", "1099511627776"]),
        &["batch = 1099511627776", "beyond"],
    );
    // A command-line value clap refuses: its usage error (status 2) names the flag.
    let o = plan(&["--device-memory", "0.5B"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--device-memory") && err.contains("below 1 MiB"),
        "{err}"
    );
    // The largest fitting micro-batch of the largest batch a run takes comes at once.
    let out = ok(&plan(&[
        "--batch",
        "16777216",
        "--seq-len",
        "32",
        "--device-memory",
        "80GB",
    ]));
    assert!(out.contains("largest micro-batch"), "{out}");

    let o = run(&["--threads", "100000", "info", model.to_str().unwrap()]);
    assert_refused(&o, &["--threads 100000", "between 1 and 1024"]);

    let (_, data) = setup(BIN, tmp.path());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let many = (threads + 1).to_string();
    let p = prune_plan(
        tmp.path(),
        "dp.toml",
        &model,
        &data,
        "[run]\nsteps = 1\nbatch_size = 64\nmicro_batch = 1\n",
    );
    let out = tmp.path().join("dp-run");
    let o = run(&[
        "prune",
        "--config",
        p.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--devices",
        &many,
    ]);
    assert_refused(&o, &[&format!("run.devices = {many}"), "CPU thread"]);
    assert!(!out.exists(), "a run directory was created");

    for (distill, says) in [
        ("temperature = 1e-30", "distill.temperature"),
        ("top_k = 1", "distill.top_k = 1"),
    ] {
        let p = shears_tests::runs::write(
            tmp.path(),
            "train.toml",
            &format!(
                "model = \"{}\"\ndata = \"{}\"\n[distill]\nteacher = \"{}\"\n{distill}\n",
                model.display(),
                data.display(),
                model.display()
            ),
        );
        let out = tmp.path().join("kd-run");
        let o = run(&[
            "train",
            "--config",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_refused(&o, &[says, "no gradient"]);
        assert!(!out.exists());
    }
}
