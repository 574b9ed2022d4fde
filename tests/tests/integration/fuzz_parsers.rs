//! A mutation fuzzer for the parsers that read files a user hands Shears: GGUF (the whole model
//! load: metadata, tensor directory, tokenizer, dequantisation, weight checks), safetensors,
//! `config.json` (with everything sized from a config: parameter counts and `shears plan`),
//! MMLU's Arrow rows (decoded into questions and both OLMES prompt formats, and a whole task
//! loaded), and a run directory's checkpoint files (`MANIFEST.json` verified, `state.json` read
//! and its sampler restored and drawn from, as `--resume` does).
//!
//! Each case takes a valid file, applies a few seeded mutations (bit flips, truncation, spliced
//! boundary integers, duplicated or deleted ranges, and for JSON, structurally replaced values),
//! and parses the result. A case passes when the parser returns `Ok` or an error that names the
//! file; a panic fails the test (and an abort on a huge allocation fails the whole binary).
//! Cases per format: 5000 in CI, `SHEARS_FUZZ_CASES=N` for longer runs; the seed of every case is
//! printed with its failure, so a crash replays with `SHEARS_FUZZ_SEED`.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use shears_core::formats::safetensors::{self, SafeTensorsFile};
use shears_core::{HostTensor, LlamaConfig, ModelFiles, WeightMap};
use shears_tests::{tiny_gguf_model, write_gguf};

fn cases() -> u64 {
    std::env::var("SHEARS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000)
}

fn first_seed() -> u64 {
    std::env::var("SHEARS_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    31,
    32,
    255,
    256,
    4095,
    65535,
    65536,
    (1 << 31) - 1,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 1,
];

/// A few random mutations of `bytes`.
fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=4) {
        if bytes.is_empty() {
            bytes.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..7) {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes[at] = rng.random(),
            2 => {
                // A boundary integer, 4 or 8 bytes wide, over whatever was there.
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let le = v.to_le_bytes();
                let w = if rng.random_bool(0.5) { 4 } else { 8 };
                for (i, b) in le[..w].iter().enumerate() {
                    if at + i < bytes.len() {
                        bytes[at + i] = *b;
                    }
                }
            }
            3 => bytes.truncate(at),
            4 => {
                let end = (at + rng.random_range(1..64)).min(bytes.len());
                let dup = bytes[at..end].to_vec();
                let to = rng.random_range(0..=bytes.len());
                bytes.splice(to..to, dup);
            }
            5 => {
                let end = (at + rng.random_range(1..64)).min(bytes.len());
                bytes.drain(at..end);
            }
            _ => {
                let n = rng.random_range(1..16);
                let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                bytes.splice(at..at, junk);
            }
        }
    }
}

/// A replacement for a JSON value: boundary numbers, wrong types, empty containers.
fn odd_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..12) {
        0 => json!(INTERESTING[rng.random_range(0..INTERESTING.len())]),
        1 => json!(-(rng.random_range(1..1_000_000i64))),
        2 => json!(1e308),
        3 => json!(-1e308),
        4 => json!(0.5),
        5 => json!(f64::MIN_POSITIVE),
        6 => json!("x"),
        7 => Value::Null,
        8 => json!([]),
        9 => json!({}),
        10 => json!(true),
        _ => json!([1, 2, 3]),
    }
}

/// Replace, remove or nest one value somewhere in `v`.
fn mutate_json(rng: &mut StdRng, v: &mut Value, depth: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[rng.random_range(0..keys.len())];
            match rng.random_range(0..4) {
                0 => {
                    m.remove(k);
                }
                1 if depth < 3 => mutate_json(rng, m.get_mut(k).unwrap(), depth + 1),
                _ => {
                    m.insert(k.clone(), odd_value(rng));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.random_range(0..a.len());
            if depth < 3 && rng.random_bool(0.5) {
                mutate_json(rng, &mut a[i], depth + 1);
            } else {
                a[i] = odd_value(rng);
            }
        }
        _ => *v = odd_value(rng),
    }
}

struct Tally {
    format: &'static str,
    ok: u64,
    errors: u64,
    failures: Vec<String>,
}

impl Tally {
    fn new(format: &'static str) -> Self {
        Tally {
            format,
            ok: 0,
            errors: 0,
            failures: vec![],
        }
    }

    /// Run one case; `name` must appear in any error message.
    fn case(&mut self, seed: u64, name: &str, f: impl FnOnce() -> Result<(), String>) {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => self.ok += 1,
            Ok(Err(msg)) if msg.contains(name) => self.errors += 1,
            Ok(Err(msg)) => self
                .failures
                .push(format!("seed {seed}: error does not name {name}: {msg}")),
            Err(p) => {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.failures.push(format!("seed {seed}: panic: {why}"));
            }
        }
    }

    fn finish(self) {
        // Back to the default hook, so the failure below is printed.
        drop(std::panic::take_hook());
        println!(
            "{}: {} cases, {} parsed, {} refused with an error, {} failures",
            self.format,
            self.ok + self.errors + self.failures.len() as u64,
            self.ok,
            self.errors,
            self.failures.len()
        );
        assert!(
            self.failures.is_empty(),
            "{} {} failures, first ones:\n{}",
            self.failures.len(),
            self.format,
            self.failures
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

fn quiet_panics() {
    // Panics are counted, not printed case by case.
    std::panic::set_hook(Box::new(|_| {}));
}

#[test]
fn gguf_loader_survives_mutated_files() {
    quiet_panics();
    let tmp = tempfile::tempdir().unwrap();
    let valid = tmp.path().join("valid.gguf");
    let (meta, tensors) = tiny_gguf_model();
    write_gguf(&valid, &meta, &tensors, None);
    let files = ModelFiles::load(&valid).expect("the unmutated file loads");
    let gemma = tmp.path().join("gemma3.gguf");
    as_gemma3(files, &gemma);
    let bases = [
        std::fs::read(&valid).unwrap(),
        std::fs::read(&gemma).unwrap(),
    ];
    let mut tally = Tally::new("gguf");
    let path = tmp.path().join("case.gguf");
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut bytes = bases[rng.random_range(0..bases.len())].clone();
        // Half the cases aim at the header and metadata, where the counts and lengths live.
        if rng.random_bool(0.5) {
            let head = bytes.len().min(4096);
            let mut h = bytes[..head].to_vec();
            mutate(&mut rng, &mut h);
            bytes.splice(..head, h);
        } else {
            mutate(&mut rng, &mut bytes);
        }
        std::fs::write(&path, &bytes).unwrap();
        tally.case(seed, "case.gguf", || {
            ModelFiles::load(&path)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    }
    tally.finish();
}

/// The tiny model as a Gemma 3 (its norms as they are, the family's extra ones added, two
/// layer kinds), exported as llama.cpp's `gemma3` GGUF with Shears' own keys.
fn as_gemma3(mut files: ModelFiles, out: &std::path::Path) {
    use shears_core::gguf_export::{write_llama_gguf, GgufQuant};
    let mut c = serde_json::to_value(&files.config).unwrap();
    c["architectures"] = json!(["Gemma3ForCausalLM"]);
    c["model_type"] = json!("gemma3_text");
    c["hidden_activation"] = json!("gelu_pytorch_tanh");
    c["sliding_window"] = json!(4);
    c["query_pre_attn_scalar"] = json!(12);
    let n = files.config.num_hidden_layers;
    c["layer_types"] = json!((0..n)
        .map(|l| if l % 2 == 0 {
            "sliding_attention"
        } else {
            "full_attention"
        })
        .collect::<Vec<_>>());
    files.config = LlamaConfig::from_json_str(&c.to_string()).unwrap();
    let shapes = files.config.uniform_layer_shapes();
    for (l, shape) in shapes.iter().enumerate() {
        for t in shears_core::LayerTensor::of(&files.config) {
            let dims = t.shape(&files.config, shape);
            files
                .weights
                .entry(t.key(l))
                .or_insert_with(|| HostTensor::f32(dims.clone(), vec![0.1; dims.iter().product()]));
        }
    }
    write_llama_gguf(&files, GgufQuant::F32, "gemma", out, false).unwrap();
    ModelFiles::load(out).expect("the Gemma 3 export loads");
}

fn tiny_weights() -> WeightMap {
    let mut w = WeightMap::new();
    w.insert(
        "a.weight".into(),
        HostTensor::f32(vec![4, 8], (0..32).map(|x| x as f32).collect()),
    );
    w.insert(
        "b.weight".into(),
        HostTensor::f32(vec![3], vec![1.0, 2.0, 3.0]).to_dtype(shears_core::DType::BF16),
    );
    w.insert(
        "c.weight".into(),
        HostTensor::f32(vec![2, 2, 2], vec![0.5; 8]).to_dtype(shears_core::DType::F16),
    );
    w
}

fn read_all(path: &Path) -> Result<(), String> {
    let f = SafeTensorsFile::open(path).map_err(|e| e.to_string())?;
    f.all_tensors().map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn safetensors_reader_survives_mutated_files() {
    quiet_panics();
    let tmp = tempfile::tempdir().unwrap();
    let valid = tmp.path().join("valid.safetensors");
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::write(&valid, &tiny_weights(), &meta).unwrap();
    let base = std::fs::read(&valid).unwrap();
    read_all(&valid).expect("the unmutated file reads");
    let header_len = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&base[8..8 + header_len]).unwrap();
    let data = &base[8 + header_len..];
    let mut tally = Tally::new("safetensors");
    let path = tmp.path().join("case.safetensors");
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = StdRng::seed_from_u64(seed);
        let bytes = if rng.random_bool(0.5) {
            // A structurally changed header (offsets, shapes, dtypes) over the same data.
            let mut h = header.clone();
            for _ in 0..rng.random_range(1..=3) {
                mutate_json(&mut rng, &mut h, 0);
            }
            let hb = serde_json::to_vec(&h).unwrap();
            let mut b = (hb.len() as u64).to_le_bytes().to_vec();
            b.extend(hb);
            b.extend(data);
            if rng.random_bool(0.3) {
                mutate(&mut rng, &mut b);
            }
            b
        } else {
            let mut b = base.clone();
            mutate(&mut rng, &mut b);
            b
        };
        std::fs::write(&path, &bytes).unwrap();
        tally.case(seed, "case.safetensors", || read_all(&path));
    }
    tally.finish();
}

#[test]
fn config_parser_survives_mutated_configs() {
    quiet_panics();
    let tmp = tempfile::tempdir().unwrap();
    let base = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": true,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 1, "eos_token_id": [2, 3]
    });
    // The families' own keys: a multimodal Gemma 3 (text_config, layer_types, ropes by layer
    // kind) and a Qwen3 with a window.
    let gemma = json!({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "query_pre_attn_scalar": 24, "sliding_window": 8, "vocab_size": 512,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                "full_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default",
                "rope_theta": 10000.0}}},
        "vision_config": {"hidden_size": 8}
    });
    let qwen = json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "use_sliding_window": true, "sliding_window": 16, "max_window_layers": 1,
        "rope_theta": 1000000.0, "tie_word_embeddings": false
    });
    let bases = [base, gemma, qwen];
    let path = tmp.path().join("config.json");
    let mut tally = Tally::new("config.json");
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = StdRng::seed_from_u64(seed);
        let base = &bases[rng.random_range(0..bases.len())];
        let text = if rng.random_bool(0.7) {
            let mut v = base.clone();
            for _ in 0..rng.random_range(1..=3) {
                mutate_json(&mut rng, &mut v, 0);
            }
            v.to_string().into_bytes()
        } else {
            let mut b = base.to_string().into_bytes();
            mutate(&mut rng, &mut b);
            b
        };
        std::fs::write(&path, &text).unwrap();
        let batch = INTERESTING[rng.random_range(0..INTERESTING.len())].min(usize::MAX as u64);
        let seq = INTERESTING[rng.random_range(0..INTERESTING.len())].min(usize::MAX as u64);
        tally.case(seed, "config.json", || {
            let cfg = LlamaConfig::from_file(&path).map_err(|e| e.to_string())?;
            // Everything sized from a config: layer shapes, parameter counts, the plan.
            let _ = cfg.uniform_layer_shapes();
            // Everything a family decides per layer, and the kept layers' config.
            let layers = cfg.num_hidden_layers.min(64);
            for l in 0..layers {
                let _ = (cfg.attention_window(l), cfg.rope_of_layer(l));
            }
            let _ = (cfg.activation(), cfg.attention_scale(), cfg.embed_scale());
            let kept: Vec<usize> = (0..layers).step_by(2).collect();
            let _ = cfg.with_layers(&kept).validate();
            let dims = shears_pruning::size::Dims::of(&cfg);
            let _ = dims.total();
            let target = shears_pruning::TargetShape {
                num_hidden_layers: cfg.num_hidden_layers,
                hidden_size: cfg.hidden_size,
                num_attention_heads: cfg.num_attention_heads,
                num_key_value_heads: cfg.num_kv_heads(),
                intermediate_size: cfg.intermediate_size,
            };
            match shears_pruning::plan::plan_configs(
                &cfg,
                target,
                None,
                &shears_pruning::memory::MemorySettings::new(batch as usize, seq as usize),
            ) {
                // Plan errors (a batch too large) name settings, not the file.
                Ok(_) | Err(_) => Ok(()),
            }
        });
    }
    tally.finish();
}

/// MMLU rows: a fixture split mutated byte-wise, read as one subject's split and turned into
/// prompts in both formats; every 25th case loads the whole task over a 57-subject folder.
#[cfg(unix)]
#[test]
fn mmlu_rows_survive_mutated_files() {
    use shears_eval::mmlu::{self, Format};
    quiet_panics();
    let tmp = tempfile::tempdir().unwrap();
    let dir = shears_tests::mmlu_folder(&tmp.path().join("mmlu"), |_, s| match s {
        "dev" => "dev.arrow",
        _ => "test.arrow",
    });
    let target = dir.join("anatomy/test/data-00000-of-00001.arrow");
    std::fs::remove_file(&target).unwrap();
    let bases: Vec<Vec<u8>> = ["dev.arrow", "test.arrow", "choices27.arrow", "empty.arrow"]
        .iter()
        .map(|f| std::fs::read(shears_tests::repo_fixture(&format!("mmlu-hostile/{f}"))).unwrap())
        .collect();
    let mut tally = Tally::new("MMLU arrow");
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut bytes = bases[rng.random_range(0..bases.len())].clone();
        mutate(&mut rng, &mut bytes);
        std::fs::write(&target, &bytes).unwrap();
        tally.case(seed, "mmlu", || {
            let qs = mmlu::read_split(&dir, "anatomy", "test").map_err(|e| e.to_string())?;
            for format in [Format::Rc, Format::Mc] {
                for q in &qs {
                    let _ = mmlu::question_text(q, format);
                    let _ = mmlu::continuations(q, format);
                }
                let _ = mmlu::preamble("anatomy", &qs[..qs.len().min(5)], format);
            }
            if seed % 25 == 0 {
                mmlu::load(&dir, "mmlu_mc", Some(shears_eval::zeroshot::Limit::Docs(1)))
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        });
    }
    tally.finish();
}

/// A checkpoint's `state.json` (a valid one, mutated byte-wise or as JSON) and `MANIFEST.json`
/// (mutated byte-wise): verified, read, and the sampler restored and drawn from, as `--resume`
/// does. A state is refused by the checkpoint's manifest (byte mutations of state.json are
/// written with a fresh manifest, so the reader itself is reached) or by its reader, naming
/// the file; never a panic.
#[test]
fn run_state_files_survive_mutation() {
    use shears_data::{DomainSampler, SamplerConfig};
    use shears_trainer::checkpoint::{self, Staging};
    use shears_trainer::records::{LoopState, StageState, TrainState, STATE_FORMAT};
    quiet_panics();
    let tmp = tempfile::tempdir().unwrap();
    let sizes: BTreeMap<String, u64> = [("alpha", 40), ("beta", 7), ("gamma", 1)]
        .map(|(k, n)| (k.to_string(), n))
        .into();
    let weights: BTreeMap<String, f64> = sizes.keys().map(|k| (k.clone(), 1.0)).collect();
    let mut sampler = DomainSampler::new(SamplerConfig::default(), &sizes, &weights).unwrap();
    for _ in 0..5 {
        sampler.draw().unwrap();
    }
    let mut sampler = sampler.state().clone();
    // A small RNG state, so the JSON mutations (through serde_json::Value, which has no
    // 128-bit integers) keep it.
    sampler.rng = rand_pcg::Pcg64Mcg::new(12345);
    let state = LoopState {
        format: STATE_FORMAT.into(),
        step: 5,
        finished: false,
        metrics_bytes: 100,
        sampler,
        reference_losses: sizes.keys().map(|k| (k.clone(), 2.5)).collect(),
        bad_steps: 0,
        stage: StageState::Train(TrainState {
            optimizer_steps: [("model".to_string(), 5)].into(),
        }),
    };
    let base: Value = serde_json::to_value(&state).unwrap();
    let root = tmp.path().join("checkpoints");
    let mut tally = Tally::new("run state");
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = StdRng::seed_from_u64(seed);
        let text = if rng.random_bool(0.6) {
            let mut v = base.clone();
            for _ in 0..rng.random_range(1..=3) {
                mutate_json(&mut rng, &mut v, 0);
            }
            v.to_string().into_bytes()
        } else {
            let mut b = base.to_string().into_bytes();
            mutate(&mut rng, &mut b);
            b
        };
        let _ = std::fs::remove_dir_all(&root);
        let s = Staging::begin(&root, 5).unwrap();
        std::fs::write(s.path().join("state.json"), &text).unwrap();
        let dir = s.commit().unwrap();
        let damage_manifest = rng.random_bool(0.3);
        if damage_manifest {
            let mpath = dir.join(checkpoint::MANIFEST);
            let mut m = std::fs::read(&mpath).unwrap();
            mutate(&mut rng, &mut m);
            std::fs::write(&mpath, m).unwrap();
        }
        let name = if damage_manifest {
            "step-00000005"
        } else {
            "state.json"
        };
        tally.case(seed, name, || {
            checkpoint::verify(&dir).map_err(|e| e.to_string())?;
            let st = LoopState::read(&dir).map_err(|e| e.to_string())?;
            // Past the reader: restoring against the data and drawing never panics (a
            // refusal here is about the data, not the file).
            if let Ok(mut s) = DomainSampler::restore(st.sampler, &sizes) {
                for _ in 0..20 {
                    if s.draw().is_err() {
                        break;
                    }
                }
            }
            Ok(())
        });
    }
    tally.finish();
}

/// `importance.safetensors`: a valid score file mutated byte-wise, read for its source, then
/// turned into importance-initialised `log_alpha`s and one-shot masks for a target.
#[test]
fn importance_files_survive_mutation() {
    use shears_pruning::{Importance, PruningSpec, TargetShape};
    quiet_panics();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::from_json_str(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":16,"hidden_size":8,"intermediate_size":6,
        "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":2,
        "rms_norm_eps":1e-5}"#,
    )
    .unwrap();
    let imp = Importance {
        heads: vec![vec![0.5, 1.0, 2.0, 0.1]; 3],
        intermediate: vec![vec![1.0, 3.0, 2.0, 0.0, 5.0, 4.0]; 3],
        hidden: (0..8).map(|i| i as f32).collect(),
        layers: vec![0.3, 0.1, 0.2],
        tokens: 64,
    };
    let path = tmp.path().join("importance.safetensors");
    imp.save(&path, &cfg).unwrap();
    let base = std::fs::read(&path).unwrap();
    let target = TargetShape {
        num_hidden_layers: 2,
        hidden_size: 4,
        num_attention_heads: 1,
        num_key_value_heads: 1,
        intermediate_size: 3,
    };
    let spec = PruningSpec::new(&cfg, target, None).unwrap();
    let mut tally = Tally::new("importance.safetensors");
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut bytes = base.clone();
        mutate(&mut rng, &mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        tally.case(seed, "importance.safetensors", || {
            let got = Importance::load(&path, &cfg).map_err(|e| e.to_string())?;
            let las = got.log_alphas(&spec);
            let masks = got.masks(&spec);
            for m in spec.modules.clone() {
                let (rows, n) = spec.mask_shape(m);
                if las.get(m).map(Vec::len) != Some(rows * n)
                    || masks.get(m).map(<[f32]>::len) != Some(rows * n)
                {
                    panic!("{}: wrong mask size", m.name());
                }
            }
            Ok(())
        });
    }
    tally.finish();
}
