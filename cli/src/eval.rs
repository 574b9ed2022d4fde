//! `shears eval`: zero-shot benchmarks and per-domain perplexity.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::tensor::{Int, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use shears_core::{DType, ModelFiles, Tokenizer};
use shears_data::Dataset;
use shears_eval::domain::{batch_tensor, domain_losses, summed_nll, EvalSettings};
use shears_eval::zeroshot::{self, Task};
use shears_models::{dispatch, load, BackendKind, BackendTask, Llama};
use shears_pruning::PruningSpec;
use shears_trainer::checkpoint::Checkpoint;
use shears_trainer::config::StageKind;

/// `shears eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// HF model directory, `.gguf` file, or a known model name.
    #[arg(long)]
    pub model: Option<String>,
    /// Evaluate a run's checkpoint instead (the newest, or --step).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// The checkpoint after this step.
    #[arg(long, requires = "run")]
    pub step: Option<usize>,
    /// Apply the pruning checkpoint's deterministic masks (exactly the target).
    #[arg(long, requires = "run")]
    pub masked: bool,
    /// Comma-separated tasks: arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq,
    /// sciq, openbookqa, csqa, lambada.
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// An extracted `oe_eval_tasks` directory (default: fetched into the cache).
    #[arg(long)]
    pub tasks_dir: Option<PathBuf>,
    /// The first N documents of each task, in doc_id order.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Requests (or sequences) per forward.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// A prepared data directory: per-domain loss and perplexity on its eval shards.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Eval sequences per domain for --data (default all).
    #[arg(long)]
    pub eval_sequences: Option<usize>,
    /// Tokens per sequence for --data (default the data's).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Use data tokenized with another tokenizer than the model's (only when you know the
    /// two vocabularies agree).
    #[arg(long)]
    pub allow_tokenizer_mismatch: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Include every request's ids and log-probs in the JSON.
    #[arg(long)]
    pub log_samples: bool,
}

/// What is evaluated: a model, optionally with a pruning checkpoint's deterministic masks.
struct Subject {
    files: ModelFiles,
    masks: Option<(Checkpoint, PruningSpec)>,
    label: String,
}

fn subject(a: &EvalArgs) -> Result<Subject> {
    match (&a.model, &a.run) {
        (Some(m), None) => {
            if a.masked {
                bail!("--masked needs --run");
            }
            Ok(Subject {
                files: crate::commands::load_model_files(m)?,
                masks: None,
                label: m.clone(),
            })
        }
        (None, Some(run)) => {
            let ckpt = Checkpoint::find(run, a.step)?;
            let files = ckpt
                .model_files()
                .with_context(|| format!("cannot load the model of {}", ckpt.dir.display()))?;
            let masks = if a.masked {
                if ckpt.state.stage.kind() != StageKind::Prune {
                    bail!(
                        "--masked needs a pruning run; {} is a '{}' run",
                        run.display(),
                        ckpt.state.stage.kind().name()
                    );
                }
                let spec = ckpt.pruning_spec(&files)?;
                Some((ckpt.clone(), spec))
            } else {
                None
            };
            let st = &ckpt.state;
            Ok(Subject {
                files,
                masks,
                label: format!(
                    "{} (step {}{})",
                    run.display(),
                    st.step,
                    if a.masked { ", masked" } else { "" }
                ),
            })
        }
        (Some(_), Some(_)) => bail!("give --model or --run, not both"),
        (None, None) => bail!("give --model (or --run with a run directory)"),
    }
}

struct EvalTask {
    subject: Subject,
    tasks: Vec<Task>,
    data: Option<(Dataset, EvalSettings)>,
    batch: usize,
    log_samples: bool,
    quiet: bool,
}

type Output = shears_core::Result<Value>;

impl BackendTask for EvalTask {
    type Output = Output;
    fn run<B: shears_models::ShearsOps>(self, device: B::Device) -> Output {
        let model: Llama<B> = load::from_files::<B>(&self.subject.files, &device, DType::F32)?;
        let fm = match &self.subject.masks {
            Some((ckpt, spec)) => {
                let (masks, _) = ckpt.masks::<B>(spec, &device)?;
                Some(
                    masks
                        .clamped()
                        .deterministic(true)
                        .to_device::<B>(&device)
                        .forward_masks(model.compute_dtype()),
                )
            }
            None => None,
        };
        let forward = |ids: Tensor<B, 2, Int>| match &fm {
            Some(m) => model.forward_masked(ids, m),
            None => model.forward(ids),
        };
        let mut out = serde_json::Map::new();
        out.insert("model".into(), json!(self.subject.label));
        if !self.tasks.is_empty() {
            let tok: &Tokenizer = self.subject.files.tokenizer()?;
            let mut tasks = serde_json::Map::new();
            let mut samples = serde_json::Map::new();
            let mut primaries = vec![];
            for task in &self.tasks {
                let bar = if self.quiet {
                    ProgressBar::hidden()
                } else {
                    ProgressBar::new(task.requests.len() as u64)
                };
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} requests [{elapsed_precise} < {eta_precise}]")
                        .expect("template")
                        .progress_chars("=> "),
                );
                bar.set_prefix(task.name.clone());
                let t = std::time::Instant::now();
                let scored = zeroshot::score_with::<B>(
                    &forward,
                    model.config.max_position_embeddings,
                    &device,
                    tok,
                    &task.requests,
                    self.batch,
                    |n| bar.set_position(n as u64),
                )?;
                bar.finish_and_clear();
                let secs = t.elapsed().as_secs_f64();
                let m = zeroshot::metrics(&task.requests, &scored, &task.primary_metric)?;
                if zeroshot::PAPER_TASKS.contains(&task.name.as_str()) {
                    primaries.push(m.primary);
                }
                let mut v = serde_json::to_value(&m).expect("metrics");
                v["seconds"] = json!(secs);
                v["requests_per_s"] = json!(task.requests.len() as f64 / secs.max(1e-9));
                tasks.insert(task.name.clone(), v);
                if self.log_samples {
                    samples.insert(
                        task.name.clone(),
                        serde_json::to_value(&scored).expect("samples"),
                    );
                }
            }
            out.insert("tasks".into(), Value::Object(tasks));
            let mean = if primaries.is_empty() {
                Value::Null
            } else {
                json!(primaries.iter().sum::<f64>() / primaries.len() as f64)
            };
            out.insert("mean".into(), mean);
            if self.log_samples {
                out.insert("samples".into(), Value::Object(samples));
            }
        }
        if let Some((data, es)) = &self.data {
            let e = domain_losses(data, es, |seqs| {
                let ids = batch_tensor::<B>(seqs, &device);
                summed_nll(match &fm {
                    Some(m) => model.nll_masked(ids, m),
                    None => model.nll(ids),
                })
            })?;
            let domains: BTreeMap<String, Value> = e
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        json!({"loss": v.loss, "perplexity": v.perplexity(), "tokens": v.tokens}),
                    )
                })
                .collect();
            out.insert("domains".into(), json!(domains));
        }
        Ok(Value::Object(out))
    }
}

pub fn eval(backend: BackendKind, a: EvalArgs) -> Result<()> {
    if a.tasks.is_empty() && a.data.is_none() {
        bail!("give --tasks (zero-shot benchmarks) and/or --data (per-domain perplexity)");
    }
    let subject = subject(&a)?;
    let mut tasks = vec![];
    if !a.tasks.is_empty() {
        for t in &a.tasks {
            if !zeroshot::TASKS.iter().any(|(n, _)| n == t) {
                bail!(
                    "unknown task '{t}'; known tasks: {}",
                    zeroshot::TASKS.map(|x| x.0).join(", ")
                );
            }
        }
        let dir = match &a.tasks_dir {
            Some(d) => d.clone(),
            None => zeroshot::tasks_dir(|m| eprintln!("{m}"))
                .context("cannot get the benchmark package")?,
        };
        for t in &a.tasks {
            tasks.push(zeroshot::load_task(&dir, t, a.limit)?);
        }
    }
    let data = match &a.data {
        Some(d) => {
            let ds =
                shears_trainer::jobs::open_data(d, &subject.files, a.allow_tokenizer_mismatch)?;
            let seq_len = a.seq_len.unwrap_or(ds.seq_len()).min(ds.seq_len());
            if seq_len < 2 {
                bail!("--seq-len {seq_len}: scoring a sequence needs at least 2 tokens");
            }
            let es = EvalSettings {
                sequences: a.eval_sequences,
                seq_len,
                batch: a.batch.max(1),
            };
            Some((ds, es))
        }
        None => None,
    };
    let v = dispatch(
        backend,
        EvalTask {
            subject,
            tasks,
            data,
            batch: a.batch,
            log_samples: a.log_samples,
            quiet: a.json,
        },
    )??;
    if a.json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!("model: {}", v["model"].as_str().unwrap_or(""));
    if let Some(tasks) = v["tasks"].as_object() {
        println!(
            "{:<14} {:>6} {:>8} {:>9} {:>13} {:>8} {:>10} {:>8}",
            "task", "n", "acc", "acc_norm", "acc_per_char", "± acc", "ppl/bpb", "req/s"
        );
        for (name, m) in tasks {
            let f = |k: &str| {
                m[k].as_f64()
                    .map(|x| format!("{:.4}", x))
                    .unwrap_or_else(|| "-".into())
            };
            let extra = match (m["perplexity"].as_f64(), m["bits_per_byte"].as_f64()) {
                (Some(p), Some(b)) => format!("{p:.1}/{b:.3}"),
                _ => "-".into(),
            };
            println!(
                "{name:<14} {:>6} {:>8} {:>9} {:>13} {:>8} {:>10} {:>8.1}",
                m["n"],
                f("acc"),
                f("acc_norm"),
                f("acc_per_char"),
                f("acc_stderr"),
                extra,
                m["requests_per_s"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(mean) = v["mean"].as_f64() {
            println!("mean of the paper's tasks (primary metrics): {mean:.4}");
        }
    }
    if let Some(d) = v["domains"].as_object() {
        println!(
            "{:<14} {:>10} {:>12} {:>10}",
            "domain", "loss", "perplexity", "tokens"
        );
        for (name, m) in d {
            println!(
                "{name:<14} {:>10.4} {:>12.2} {:>10}",
                m["loss"].as_f64().unwrap_or(f64::NAN),
                m["perplexity"].as_f64().unwrap_or(f64::NAN),
                m["tokens"]
            );
        }
    }
    Ok(())
}
