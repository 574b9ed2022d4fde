//! `shears bench`: throughput numbers for choosing the default backend. Numbers are printed,
//! never asserted.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::Subcommand;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use shears_core::{DType, LlamaConfig, ModelFiles};
use shears_models::{dispatch, dispatch_autodiff, load, AutodiffTask, BackendKind, BackendTask};
use shears_trainer::{AdamWSettings, Compute, LmStage, Stage};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Each fused kernel (attention, LM head + cross-entropy) against its generic composition
    /// of burn ops on one backend (default: the default backend), forward and forward +
    /// backward, and the GEMM rate on the projection shapes. Shapes default to SmolLM2-135M's.
    Kernels(KernelsArgs),
    /// Tokenization + packing throughput (tokens/s, all cores) of a data plan, and sampler
    /// throughput (sequences/s read from the memory-mapped shards).
    Data(DataArgs),
    /// Training-step time of a real model with and without pruning masks (sampled hard-concrete
    /// masks, Lagrangian, three optimizers) on one backend (default: the default backend).
    Prune(PruneArgs),
    /// Tokens/s of a real model's forward (batch 1 x L and 8 x L) and of a tiny LLaMA training
    /// step (vocab 8192, hidden 256, 4 layers, 4 heads, intermediate 688, batch 8 x L).
    Forward(ForwardArgs),
}

/// `shears bench kernels`.
#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 9)]
    heads: usize,
    #[arg(long, default_value_t = 3)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 576)]
    hidden: usize,
    #[arg(long, default_value_t = 1536)]
    intermediate: usize,
    #[arg(long, default_value_t = 49152)]
    vocab: usize,
    /// Timed runs per figure (median reported, after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
}

/// `shears bench data`.
#[derive(clap::Args, Debug)]
pub struct DataArgs {
    /// Data plan (default: the demo corpus's, from `shears corpus fetch-demo`).
    #[arg(long)]
    plan: Option<std::path::PathBuf>,
    /// Sequences drawn for the sampler figure.
    #[arg(long, default_value_t = 200_000)]
    draws: usize,
}

/// `shears bench prune`.
#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// Model (path or known name).
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Timed pairs of steps (a plain step, then a masked step), after one warm-up step each.
    #[arg(long, default_value_t = 2)]
    iters: usize,
    /// Which steps to time: both (alternating pairs), plain (continued pre-training only) or
    /// masked (the pruning step only; one model in memory, for peak-memory figures).
    #[arg(long, default_value = "both", value_parser = ["both", "plain", "masked"])]
    only: String,
    #[command(flatten)]
    compute: crate::train::ComputeArgs,
    /// Peak dense TFLOP/s of the device, to report MFU (989 for an H200 in bf16).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
}

/// `shears bench forward`.
#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    /// Model for the forward figures (path or known name).
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Timed repetitions per figure (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Sequence length L.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Skip the real-model figures.
    #[arg(long)]
    skip_model: bool,
    /// Also time the real model's training step (forward + backward + AdamW, batch 1 x L
    /// and 4 x L) and its pruning step (batch 4 x L, every structure masked).
    #[arg(long)]
    train: bool,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

/// Seeded random token ids: `batch` sequences of `len`.
fn random_seqs(batch: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..batch)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect()
}

fn random_ids<B: Backend>(
    batch: usize,
    len: usize,
    vocab: usize,
    seed: u64,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<i64> = (0..batch * len)
        .map(|_| rng.random_range(0..vocab as i64))
        .collect();
    Tensor::from_data(TensorData::new(v, [batch, len]), device)
}

/// Seconds `f` takes.
fn secs(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// The middle value, or the mean of the two middle values of an even count.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite timings"));
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// Median seconds of one run, over `iters` timed runs after one warm-up (first-call allocation
/// and kernel selection).
fn timed(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    median((0..iters.max(1)).map(|_| secs(&mut f)).collect())
}

struct ForwardBench<'a> {
    files: &'a ModelFiles,
    batches: &'a [usize],
    len: usize,
    iters: usize,
}

impl BackendTask for ForwardBench<'_> {
    type Output = shears_core::Result<Vec<(usize, f64)>>;
    fn run<B: shears_models::ShearsOps>(self, device: B::Device) -> Self::Output {
        let model = load::from_files::<B>(self.files, &device, DType::F32)?;
        let vocab = self.files.config.vocab_size;
        Ok(self
            .batches
            .iter()
            .map(|&b| {
                let ids = random_ids::<B>(b, self.len, vocab, 1, &device);
                let secs = timed(self.iters, || {
                    let logits = model.forward(ids.clone());
                    // Reading one value forces the whole computation to finish.
                    let _ = logits.narrow(2, 0, 1).sum().into_data();
                });
                (b, (b * self.len) as f64 / secs)
            })
            .collect())
    }
}

/// The tiny LLaMA of the benchmark.
pub fn tiny_config(seq_len: usize) -> LlamaConfig {
    LlamaConfig::from_json_str(&format!(
        r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":8192,"hidden_size":256,
        "intermediate_size":688,"num_hidden_layers":4,"num_attention_heads":4,
        "num_key_value_heads":4,"rms_norm_eps":1e-5,"max_position_embeddings":{seq_len},
        "tie_word_embeddings":false}}"#
    ))
    .expect("valid tiny config")
}

struct TrainBench {
    batch: usize,
    len: usize,
    iters: usize,
}

impl AutodiffTask for TrainBench {
    type Output = shears_core::Result<f64>;
    fn run<B: shears_models::ShearsAutodiff>(self, device: B::Device) -> Self::Output {
        let config = tiny_config(self.len);
        let model = load::random_model::<B>(&config, 0, &device)?;
        let mut trainer = LmStage::from_model(model, AdamWSettings::pytorch());
        let ids = random_seqs(self.batch, self.len, config.vocab_size, 2);
        let mut t = 0;
        let secs = timed(self.iters, || {
            trainer.step(&ids, t, 0, 1.0);
            t += 1;
        });
        Ok((self.batch * self.len) as f64 / secs)
    }
}

/// Training steps (forward, backward, AdamW) of a real model at several batch sizes.
struct ModelTrainBench<'a> {
    files: &'a ModelFiles,
    batches: &'a [usize],
    len: usize,
    iters: usize,
}

impl AutodiffTask for ModelTrainBench<'_> {
    /// (batch, tokens/s, seconds per step)
    type Output = shears_core::Result<Vec<(usize, f64, f64)>>;
    fn run<B: shears_models::ShearsAutodiff>(self, device: B::Device) -> Self::Output {
        let vocab = self.files.config.vocab_size;
        let mut trainer = LmStage::<B>::new(self.files, AdamWSettings::pytorch(), &device)?;
        Ok(self
            .batches
            .iter()
            .map(|&b| {
                let ids = random_seqs(b, self.len, vocab, 4);
                let secs = timed(self.iters, || {
                    trainer.step(&ids, 0, 0, 1.0);
                });
                (b, (b * self.len) as f64 / secs, secs)
            })
            .collect())
    }
}

struct PruneBench<'a> {
    files: &'a ModelFiles,
    batch: usize,
    len: usize,
    iters: usize,
    plain: bool,
    masked: bool,
    compute: Compute,
}

/// Median seconds per step without and with masks (each when timed), and the median of the
/// per-pair ratios (when both are).
type PruneTimes = (Option<f64>, Option<f64>, Option<f64>);

impl AutodiffTask for PruneBench<'_> {
    type Output = shears_core::Result<PruneTimes>;
    fn run<B: shears_models::ShearsAutodiff>(self, device: B::Device) -> Self::Output {
        use shears_pruning::{PruningSpec, TargetShape};
        use shears_trainer::{PruneRates, PruneStage};
        let vocab = self.files.config.vocab_size;
        let ids = random_seqs(self.batch, self.len, vocab, 3);
        let rates = PruneRates::default();
        let mut plain = if self.plain {
            Some(LmStage::<B>::new(self.files, rates.model, &device)?.with_compute(self.compute))
        } else {
            None
        };
        // Prune every structure at once (the heaviest mask configuration): a target two thirds
        // the source's size in every dimension.
        let c = &self.files.config;
        let g = (c.num_kv_heads() * 2 / 3).max(1);
        let r = (c.num_attention_heads / c.num_kv_heads())
            .saturating_sub(1)
            .max(1);
        let target = TargetShape {
            num_hidden_layers: (c.num_hidden_layers * 2 / 3).max(1),
            hidden_size: (c.hidden_size * 2 / 3).max(1),
            num_attention_heads: g * r,
            num_key_value_heads: g,
            intermediate_size: (c.intermediate_size * 2 / 3).max(1),
        };
        let spec = PruningSpec::new(c, target, None)?;
        let mut masked = if self.masked {
            Some(
                PruneStage::<B>::new(self.files, &spec, rates, 0, &device)?
                    .with_compute(self.compute),
            )
        } else {
            None
        };
        // One warm-up step each, then plain and masked steps alternate, so a host whose speed
        // drifts from minute to minute slows both sides of each pair alike.
        let check = |what: &str, loss: f64| {
            if !loss.is_finite() {
                return Err(shears_core::Error::invalid(format!(
                    "the {what} step's loss is {loss}"
                )));
            }
            Ok(())
        };
        if let Some(p) = plain.as_mut() {
            check("plain", p.step(&ids, 0, 0, 1.0).lm)?;
        }
        if let Some(m) = masked.as_mut() {
            check("masked", m.step(&ids, 0, 0, 1.0).lm)?;
        }
        let mut pairs: Vec<StepPair> = vec![];
        for t in 1..=self.iters.max(1) {
            let mut loss = (0.0, 0.0);
            let p = plain.as_mut().map(|p| {
                secs(|| {
                    loss.0 = p.step(&ids, t, 0, 1.0).lm;
                })
            });
            let m = masked.as_mut().map(|m| {
                secs(|| {
                    loss.1 = m.step(&ids, t, t as u64, 1.0).lm;
                })
            });
            check("plain", loss.0)?;
            check("masked", loss.1)?;
            eprintln!("step {t}: plain {p:.3?} s, masked {m:.3?} s");
            pairs.push((p, m));
        }
        let med = |f: &dyn Fn(&StepPair) -> Option<f64>| {
            let v: Vec<f64> = pairs.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| median(v))
        };
        Ok((
            med(&|p| p.0),
            med(&|p| p.1),
            med(&|p| p.0.zip(p.1).map(|(a, b)| b / a)),
        ))
    }
}

/// Seconds of one plain and one masked step (each `None` when not timed).
type StepPair = (Option<f64>, Option<f64>);

/// Run a benchmark on `only` (the global `--backend`), or on every compiled CPU backend.
pub fn run(cmd: BenchCmd, only: Option<BackendKind>) -> Result<()> {
    match cmd {
        BenchCmd::Forward(a) => bench_forward(a, only),
        BenchCmd::Data(a) => bench_data(a.plan, a.draws),
        BenchCmd::Kernels(a) => bench_kernels(a, only),
        BenchCmd::Prune(a) => bench_prune(a, only),
    }
}

/// The backend a one-backend benchmark runs on.
fn one_backend(only: Option<BackendKind>) -> BackendKind {
    only.or_else(BackendKind::default_backend)
        .expect("a compiled backend")
}

fn bench_kernels(a: KernelsArgs, only: Option<BackendKind>) -> Result<()> {
    if a.heads == 0
        || a.kv_heads == 0
        || !a.heads.is_multiple_of(a.kv_heads)
        || a.batch == 0
        || a.seq_len == 0
    {
        anyhow::bail!(
            "--heads must be a positive multiple of --kv-heads, and --batch and --seq-len positive"
        );
    }
    let shapes = crate::bench_kernels::KernelShapes {
        batch: a.batch,
        seq_len: a.seq_len,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        hidden: a.hidden,
        intermediate: a.intermediate,
        vocab: a.vocab,
        iters: a.iters,
    };
    let bench = crate::bench_kernels::KernelBench {
        shapes,
        json: a.json,
    };
    dispatch_autodiff(one_backend(only), bench)?;
    Ok(())
}

fn bench_prune(a: PruneArgs, only: Option<BackendKind>) -> Result<()> {
    let kind = one_backend(only);
    let files = crate::commands::load_model_files(&a.model)?;
    let mut run = shears_trainer::config::RunSettings::default();
    a.compute.apply(&mut run, kind);
    let compute = run.compute(kind == BackendKind::Cuda);
    let (plain, masked, ratio) = dispatch_autodiff(
        kind,
        PruneBench {
            files: &files,
            batch: a.batch,
            len: a.seq_len,
            iters: a.iters,
            plain: a.only != "masked",
            masked: a.only != "plain",
            compute,
        },
    )??;
    let (batch, seq_len, iters) = (a.batch, a.seq_len, a.iters);
    let tokens = (batch * seq_len) as f64;
    let flop_params = matmul_params(&files);
    // MFU: 6 x (parameters in matmuls) x tokens/s over the device's peak; attention's score
    // and context products are not counted.
    let mfu = |s: Option<f64>| {
        s.zip(a.peak_tflops)
            .map(|(s, peak)| 6.0 * flop_params as f64 * tokens / s / (peak * 1e12))
    };
    if a.json {
        println!(
            "{}",
            json!({"backend": kind.name(), "model": files.source.display().to_string(), "batch": batch,
                "seq_len": seq_len, "iters": iters, "precision": compute.precision.name(),
                "optimizer_state": compute.optimizer_state.name(),
                "checkpointing": compute.checkpointing.name(), "matmul_params": flop_params,
                "step_s_without_masks": plain, "step_s_with_masks": masked,
                "tokens_per_s_without_masks": plain.map(|s| tokens / s),
                "tokens_per_s_with_masks": masked.map(|s| tokens / s),
                "mfu_without_masks": mfu(plain), "mfu_with_masks": mfu(masked),
                "mask_overhead": ratio.map(|r| r - 1.0)})
        );
    } else {
        println!("# shears bench prune: {} on {kind} ({}, checkpointing {}), batch {batch} x {seq_len}, {iters} timed steps after 1 warm-up each; medians, overhead = median of the pairs' ratios", files.source.display(), compute.precision, compute.checkpointing);
        let line = |what: &str, s: Option<f64>| {
            if let Some(s) = s {
                let m = mfu(Some(s)).map_or(String::new(), |m| format!(", MFU {:.1}%", 100.0 * m));
                println!("{what}: {s:.3} s ({:.0} tokens/s{m})", tokens / s);
            }
        };
        line("training step without masks", plain);
        line("training step with masks   ", masked);
        if let Some(r) = ratio {
            println!("mask overhead: {:+.1}%", 100.0 * (r - 1.0));
        }
    }
    Ok(())
}

/// Parameters that take part in a matmul per token: every weight but an untied input
/// embedding (a lookup); a tied embedding counts once, as the LM head.
fn matmul_params(files: &ModelFiles) -> u64 {
    let c = &files.config;
    let total: u64 = files.weights.values().map(|t| t.numel() as u64).sum();
    let embed = (c.vocab_size * c.hidden_size) as u64;
    if c.tie_word_embeddings {
        total
    } else {
        total - embed
    }
}

/// One backend's row of `shears bench forward`.
struct ForwardRow {
    f1: Option<f64>,
    f8: Option<f64>,
    tiny_train: f64,
    /// Real-model training tokens/s at batch 1 and 4, and seconds per step at 4.
    t1: Option<f64>,
    t4: Option<f64>,
    t4s: Option<f64>,
    /// (plain, masked, ratio) seconds per pruning step.
    prune: Option<(f64, f64, f64)>,
}

fn forward_row(
    kind: BackendKind,
    files: Option<&ModelFiles>,
    a: &ForwardArgs,
) -> Result<ForwardRow> {
    let (len, iters) = (a.seq_len, a.iters);
    let fwd = match files {
        Some(f) => dispatch(
            kind,
            ForwardBench {
                files: f,
                batches: &[1, 8],
                len,
                iters,
            },
        )??,
        None => vec![],
    };
    let tiny_train = dispatch_autodiff(
        kind,
        TrainBench {
            batch: 8,
            len,
            iters,
        },
    )??;
    let (mtrain, prune) = match (files, a.train) {
        (Some(f), true) => {
            let t = dispatch_autodiff(
                kind,
                ModelTrainBench {
                    files: f,
                    batches: &[1, 4],
                    len,
                    iters,
                },
            )??;
            let p = dispatch_autodiff(
                kind,
                PruneBench {
                    files: f,
                    batch: 4,
                    len,
                    iters: iters.min(2),
                    plain: true,
                    masked: true,
                    compute: Compute::default(),
                },
            )??;
            let p = match p {
                (Some(a), Some(b), Some(r)) => Some((a, b, r)),
                _ => None,
            };
            (t, p)
        }
        _ => (vec![], None),
    };
    let at = |xs: &[(usize, f64)], b: usize| xs.iter().find(|x| x.0 == b).map(|x| x.1);
    let m: Vec<(usize, f64)> = mtrain.iter().map(|x| (x.0, x.1)).collect();
    Ok(ForwardRow {
        f1: at(&fwd, 1),
        f8: at(&fwd, 8),
        tiny_train,
        t1: at(&m, 1),
        t4: at(&m, 4),
        t4s: mtrain.iter().find(|x| x.0 == 4).map(|x| x.2),
        prune,
    })
}

fn bench_forward(a: ForwardArgs, only: Option<BackendKind>) -> Result<()> {
    let backends: Vec<BackendKind> = match only {
        Some(b) => vec![b],
        None => BackendKind::compiled()
            .into_iter()
            .filter(|b| b.is_cpu())
            .collect(),
    };
    let files = if a.skip_model {
        None
    } else {
        Some(crate::commands::load_model_files(&a.model)?)
    };
    let threads = rayon::current_num_threads();
    let isa = shears_models::ops::simd::Isa::detect().name();
    let (seq_len, iters) = (a.seq_len, a.iters);
    if !a.json {
        println!(
            "# shears bench forward: L = {seq_len}, median of {iters} timed runs after 1 warm-up, {threads} CPU threads, {isa} kernels"
        );
        println!(
            "{:<8} {:>22} {:>22} {:>26}",
            "backend", "model fwd 1xL tok/s", "model fwd 8xL tok/s", "tiny train step 8xL tok/s"
        );
    }
    for kind in backends {
        let r = forward_row(kind, files.as_ref(), &a)?;
        if a.json {
            println!(
                "{}",
                json!({"backend": kind.name(), "seq_len": seq_len, "iters": iters, "threads": threads,
                    "isa": isa,
                    "model": files.as_ref().map(|f| f.source.display().to_string()),
                    "forward_1_tok_s": r.f1, "forward_8_tok_s": r.f8,
                    "train_1_tok_s": r.t1, "train_4_tok_s": r.t4, "train_4_step_s": r.t4s,
                    "prune_4_step_s": r.prune.map(|p| p.1), "plain_4_step_s": r.prune.map(|p| p.0),
                    "prune_over_plain": r.prune.map(|p| p.2),
                    "tiny_train_8_tok_s": r.tiny_train})
            );
            continue;
        }
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "{:<8} {:>22} {:>22} {:>26.0}",
            kind.name(),
            fmt(r.f1),
            fmt(r.f8),
            r.tiny_train
        );
        if let Some((plain, masked, ratio)) = r.prune {
            println!(
                "{:<8} model train step 1xL {} tok/s, 4xL {} tok/s ({:.2} s); pruning step 4xL {masked:.2} s vs plain {plain:.2} s ({:.3}x)",
                "",
                fmt(r.t1),
                fmt(r.t4),
                r.t4s.unwrap_or(f64::NAN),
                ratio
            );
        }
    }
    Ok(())
}

fn bench_data(plan: Option<std::path::PathBuf>, draws: usize) -> Result<()> {
    use shears_data::{Dataset, DomainSampler, SamplerConfig, Split};
    let path = plan.unwrap_or_else(|| {
        shears_core::hub::cache_dir()
            .join("corpus")
            .join("demo")
            .join("plan.toml")
    });
    let plan = shears_data::DataPlan::from_file(&path).map_err(|e| {
        anyhow::anyhow!("{e} (run `shears corpus fetch-demo` first, or pass --plan)")
    })?;
    let files = crate::commands::load_model_files(&plan.tokenizer)?;
    let tok = files.tokenizer()?;
    let tmp = std::env::temp_dir().join(format!("shears-bench-data-{}", std::process::id()));
    let started = Instant::now();
    let outcome = shears_data::prepare(&plan, tok, &plan.tokenizer, &tmp, true, &|_| {})?;
    let secs = started.elapsed().as_secs_f64();
    let tokens: u64 = outcome
        .manifest
        .domains
        .values()
        .map(|d| d.train_tokens + d.eval_tokens + d.dropped_train_tokens + d.dropped_eval_tokens)
        .sum();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "# shears bench data: {} ({} domains), {threads} threads",
        path.display(),
        outcome.manifest.domains.len()
    );
    println!("prepare (read, tokenize, split, pack, write): {tokens} tokens in {secs:.1} s = {:.0} tokens/s", tokens as f64 / secs);

    let ds = Dataset::open(&tmp)?;
    let sizes: std::collections::BTreeMap<String, u64> = ds
        .domains()
        .into_iter()
        .map(|d| {
            let n = ds.split(&d, Split::Train).map(|s| s.len()).unwrap_or(0);
            (d, n)
        })
        .collect();
    let weights = sizes.keys().map(|k| (k.clone(), 1.0)).collect();
    let cfg = SamplerConfig {
        exhaustion: shears_data::Exhaustion::Wrap,
        ..Default::default()
    };
    let mut sampler = DomainSampler::new(cfg, &sizes, &weights)?;
    let mut buf = Vec::with_capacity(ds.seq_len());
    let mut checksum = 0u64;
    let started = Instant::now();
    for _ in 0..draws {
        let d = sampler.draw()?;
        buf.clear();
        ds.split(&d.domain, Split::Train)?
            .read_into(d.index, &mut buf)?;
        checksum = checksum.wrapping_add(buf[0] as u64);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sampler (draw + read {} tokens from mmap): {:.0} sequences/s = {:.0} tokens/s (checksum {checksum})",
        ds.seq_len(),
        draws as f64 / secs,
        (draws * ds.seq_len()) as f64 / secs
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
