//! The training commands: prune, finalize, train, run (the pipeline) and demo.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use shears_core::DType;
use shears_models::{dispatch, dispatch_autodiff, AutodiffTask, BackendKind, BackendTask};
use shears_pruning::{FinalizeOptions, TargetShape};
use shears_trainer::compute::{Checkpointing, Precision, StatePrecision};
use shears_trainer::config::{read_toml, PruneMethod, RunSettings};
use shears_trainer::jobs::{self, JobOptions};
use shears_trainer::pipeline::{
    self, DataSource, EvalPart, ExportPart, PipelineOptions, PipelineOutcome, PipelinePlan,
    PrunePart, TrainPart,
};
use shears_trainer::{Outcome, PruneConfig, TrainConfig};

/// What a command run to completion or interruption means for the exit code.
pub enum Ended {
    Done,
    Interrupted,
}

fn read_plan(path: &Path) -> Result<String> {
    Ok(shears_core::fsutil::read_text(
        path,
        shears_core::fsutil::SETTINGS_FILE_BYTES,
    )?)
}

fn backend_of(cli: BackendKind, run: &RunSettings) -> Result<BackendKind> {
    match &run.backend {
        Some(name) => name
            .parse::<BackendKind>()
            .map_err(|e| anyhow::anyhow!("run.backend: {e}")),
        None => Ok(cli),
    }
}

/// Compute overrides shared by `prune`, `train` and `run`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ComputeArgs {
    /// Numeric precision, f32 or bf16-mixed (overrides the plan's `run.precision`; default
    /// bf16-mixed on cuda, f32 elsewhere).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Precision of AdamW's moments, f32 or bf16 (overrides `run.optimizer_state`).
    #[arg(long)]
    pub optimizer_state: Option<StatePrecision>,
    /// Activation checkpointing, none or layers (overrides `run.checkpointing`).
    #[arg(long)]
    pub checkpointing: Option<Checkpointing>,
    /// Data-parallel ranks, one device each (cuda:0..N-1; on the CPU backends N replicas
    /// sharing the cores); overrides `run.devices`.
    #[arg(long)]
    pub devices: Option<usize>,
}

impl ComputeArgs {
    /// Write the overrides into `run`, and the backend's default precision where neither the
    /// plan nor the command line chose one (so `resolved.toml` says what ran).
    pub(crate) fn apply(&self, run: &mut RunSettings, backend: BackendKind) {
        if let Some(p) = self.precision {
            run.precision = Some(p);
        }
        if let Some(o) = self.optimizer_state {
            run.optimizer_state = o;
        }
        if let Some(c) = self.checkpointing {
            run.checkpointing = c;
        }
        if let Some(n) = self.devices {
            run.devices = n;
        }
        run.precision = Some(run.compute(backend == BackendKind::Cuda).precision);
    }
}

fn report(outcome: Outcome, what: &str, run: &Path) -> Ended {
    match outcome {
        Outcome::Finished { step, checkpoint } => {
            eprintln!(
                "{what} finished after {step} steps; final checkpoint {}",
                checkpoint.display()
            );
            println!("{}", run.display());
            Ended::Done
        }
        Outcome::Interrupted { step, checkpoint } => {
            eprintln!(
                "{what} interrupted after step {step}; checkpoint {}; continue with --resume",
                checkpoint.display()
            );
            Ended::Interrupted
        }
    }
}

struct PruneTask {
    config: PruneConfig,
    job: JobOptions,
}

impl AutodiffTask for PruneTask {
    type Output = shears_core::Result<Outcome>;
    fn run<B: shears_models::ShearsAutodiff>(self, device: B::Device) -> Self::Output {
        jobs::prune::<B>(&self.config, &self.job, device)
    }
}

struct TrainTask {
    config: TrainConfig,
    job: JobOptions,
}

impl AutodiffTask for TrainTask {
    type Output = shears_core::Result<Outcome>;
    fn run<B: shears_models::ShearsAutodiff>(self, device: B::Device) -> Self::Output {
        jobs::train::<B>(&self.config, &self.job, device)
    }
}

fn job(out: PathBuf, plan_text: String, a: &StageArgs) -> JobOptions {
    JobOptions {
        out,
        plan_text,
        resume: a.resume,
        progress: true,
        echo: true,
        interrupt: jobs::interrupt_flag(),
        allow_tokenizer_mismatch: a.allow_tokenizer_mismatch,
        source_losses: None,
    }
}

fn out_dir(flag: Option<PathBuf>, config: &Path, stage: &str) -> PathBuf {
    flag.unwrap_or_else(|| {
        let stem = config
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| stage.to_string());
        PathBuf::from("runs").join(stem)
    })
}

pub fn prune(backend: BackendKind, a: StageArgs) -> Result<Ended> {
    let config = a.config.as_path();
    let text = read_plan(config)?;
    let mut cfg: PruneConfig = read_toml(config)?;
    let out = out_dir(a.out.clone(), config, "prune");
    if cfg.pruning.method == PruneMethod::Importance {
        return one_shot(backend, cfg, out, &a);
    }
    let kind = backend_of(backend, &cfg.run)?;
    a.compute.apply(&mut cfg.run, kind);
    let outcome = dispatch_autodiff(
        kind,
        PruneTask {
            config: cfg,
            job: job(out.clone(), text, &a),
        },
    )??;
    Ok(report(outcome, "pruning", &out))
}

struct OneShotTask {
    config: PruneConfig,
    out: PathBuf,
    overwrite: bool,
    allow_tokenizer_mismatch: bool,
}

impl BackendTask for OneShotTask {
    type Output = shears_core::Result<jobs::FinalizeReport>;
    fn run<B: shears_models::ShearsOps>(self, device: B::Device) -> Self::Output {
        jobs::prune_one_shot::<B>(
            &self.config,
            &self.out,
            self.overwrite,
            self.allow_tokenizer_mismatch,
            &device,
        )
    }
}

/// `shears prune` with `[pruning] method = "importance"`: the dense model of the target, in
/// one pass (`--resume` replaces an earlier one-shot output).
fn one_shot(backend: BackendKind, cfg: PruneConfig, out: PathBuf, a: &StageArgs) -> Result<Ended> {
    let kind = backend_of(backend, &cfg.run)?;
    let r = dispatch(
        kind,
        OneShotTask {
            config: cfg,
            out: out.clone(),
            overwrite: a.resume,
            allow_tokenizer_mismatch: a.allow_tokenizer_mismatch,
        },
    )?
    .with_context(|| format!("cannot prune into {}", out.display()))?;
    eprintln!(
        "pruned in one shot by activation importance: {}",
        pruned_shape(&r)
    );
    println!("{}", r.out.display());
    Ok(Ended::Done)
}

/// `N → M parameters; the target's shape`, as finalize and one-shot pruning report it.
fn pruned_shape(r: &jobs::FinalizeReport) -> String {
    let t = TargetShape::of(&r.config);
    format!(
        "{} → {} parameters; {} layers, hidden {}, {} heads ({} kv), intermediate {}",
        r.source_params,
        r.pruned_params,
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.intermediate_size
    )
}

pub fn train(backend: BackendKind, a: StageArgs) -> Result<Ended> {
    let config = a.config.as_path();
    let text = read_plan(config)?;
    let mut cfg: TrainConfig = read_toml(config)?;
    let out = out_dir(a.out.clone(), config, "train");
    let kind = backend_of(backend, &cfg.run)?;
    a.compute.apply(&mut cfg.run, kind);
    let outcome = dispatch_autodiff(
        kind,
        TrainTask {
            config: cfg,
            job: job(out.clone(), text, &a),
        },
    )??;
    Ok(report(outcome, "training", &out))
}

struct FinalizeTask {
    run: PathBuf,
    step: Option<usize>,
    out: PathBuf,
    opts: FinalizeOptions,
    dtype: Option<DType>,
    force: bool,
}

impl BackendTask for FinalizeTask {
    type Output = shears_core::Result<jobs::FinalizeReport>;
    fn run<B: shears_models::ShearsOps>(self, device: B::Device) -> Self::Output {
        jobs::finalize_run::<B>(
            &self.run, self.step, &self.out, self.opts, self.dtype, self.force, &device,
        )
    }
}

/// `shears finalize`.
#[derive(clap::Args, Debug)]
pub struct FinalizeArgs {
    /// The pruning run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Use the checkpoint after this step (default: the newest).
    #[arg(long)]
    pub step: Option<usize>,
    /// Store weights as f32, f16 or bf16 (default f32).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Reproduce the reference conversion's LM-head scaling (method §6.1).
    #[arg(long)]
    pub compat_reference_lm_head: bool,
    /// Replace an existing model in --out.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

/// `shears prune` and `shears train`.
#[derive(clap::Args, Debug)]
pub struct StageArgs {
    /// The plan (TOML): `model`, `data`, a `[target]` for pruning, and any of the settings
    /// `shears defaults prune|train` prints with their defaults.
    #[arg(long)]
    pub config: PathBuf,
    /// Run directory (default: `runs/<plan name>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the run directory's newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Use data tokenized with another tokenizer than the model's (only when you know the
    /// two vocabularies agree).
    #[arg(long)]
    pub allow_tokenizer_mismatch: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn finalize(backend: BackendKind, a: FinalizeArgs) -> Result<()> {
    let FinalizeArgs {
        run,
        out,
        step,
        dtype,
        compat_reference_lm_head,
        force,
        json,
    } = a;
    let r = dispatch(
        backend,
        FinalizeTask {
            run: run.clone(),
            step,
            out: out.clone(),
            opts: FinalizeOptions {
                compat_reference_lm_head,
            },
            dtype,
            force,
        },
    )?
    .with_context(|| format!("cannot finalize {}", run.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        eprintln!(
            "finalized {} (step {}): {}",
            r.checkpoint.display(),
            r.step,
            pruned_shape(&r)
        );
        println!("{}", r.out.display());
    }
    Ok(())
}

struct PipelineTask {
    plan: PipelinePlan,
    text: String,
    resume: bool,
    allow_tokenizer_mismatch: bool,
}

impl AutodiffTask for PipelineTask {
    type Output = shears_core::Result<PipelineOutcome>;
    fn run<B: shears_models::ShearsAutodiff>(self, device: B::Device) -> Self::Output {
        pipeline::run_pipeline::<B>(
            &self.plan,
            &self.text,
            &PipelineOptions {
                resume: self.resume,
                progress: true,
                interrupt: jobs::interrupt_flag(),
                allow_tokenizer_mismatch: self.allow_tokenizer_mismatch,
            },
            device,
        )
    }
}

fn run_plan(
    backend: BackendKind,
    plan: PipelinePlan,
    text: String,
    resume: bool,
    allow_tokenizer_mismatch: bool,
) -> Result<Ended> {
    let started = std::time::Instant::now();
    let mut plan = plan;
    ComputeArgs::default().apply(&mut plan.prune.run, backend);
    ComputeArgs::default().apply(&mut plan.train.run, backend);
    let out = plan.out.clone();
    let task = PipelineTask {
        plan,
        text,
        resume,
        allow_tokenizer_mismatch,
    };
    let outcome = dispatch_autodiff(backend, task)??;
    match outcome {
        PipelineOutcome::Done(s) => {
            print!("{}", render_summary(&s));
            eprintln!(
                "pipeline finished in {:.1} min; summary: {}",
                started.elapsed().as_secs_f64() / 60.0,
                out.join("summary.json").display()
            );
            Ok(Ended::Done)
        }
        PipelineOutcome::Interrupted { stage, step } => {
            eprintln!("interrupted in stage {stage} after step {step}; continue with --resume");
            Ok(Ended::Interrupted)
        }
    }
}

/// `shears run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The pipeline plan (TOML).
    pub plan: PathBuf,
    /// Continue a pipeline stage by stage.
    #[arg(long)]
    pub resume: bool,
    /// Use data tokenized with another tokenizer than the model's (only when you know the
    /// two vocabularies agree).
    #[arg(long)]
    pub allow_tokenizer_mismatch: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(backend: BackendKind, a: RunArgs) -> Result<Ended> {
    let text = read_plan(&a.plan)?;
    let mut p: PipelinePlan = read_toml(&a.plan)?;
    a.compute.apply(&mut p.prune.run, backend);
    a.compute.apply(&mut p.train.run, backend);
    run_plan(backend, p, text, a.resume, a.allow_tokenizer_mismatch)
}

/// The demo's plan: SmolLM2-135M-Instruct pruned to 20 layers, hidden 384, 6 heads (3 kv),
/// intermediate 1024, on the demo corpus; `quick` is the few-minutes budget CI runs.
pub fn demo_plan(out: &Path, corpus: &Path, quick: bool) -> Result<PipelinePlan> {
    let mut data = shears_data::DataPlan::from_file(corpus.join("plan.toml"))?;
    // (tokens per sequence, pruning steps, training steps, batch, eval intervals, eval
    // sequences per domain). The quick budget checkpoints only at the end of each stage: a
    // SmolLM2 checkpoint (weights and AdamW moments) is 1.6 GB.
    //
    // The full budget (about 15 minutes on 2 cores with the fused CPU kernels): 120 pruning
    // steps and 300 continued pre-training steps of 2 x 128 tokens, i.e. 30,720 and 76,800
    // training tokens (four and six times what the composed-op engine afforded in the same
    // time).
    let (seq, steps_p, steps_t, batch, every_p, every_t, eval_seqs) = if quick {
        (64, 4, 4, 1, 2, 2, 1)
    } else {
        (128, 120, 300, 2, 30, 50, 4)
    };
    data.seq_len = seq;
    let run = |steps: usize, every: usize| RunSettings {
        steps,
        batch_size: batch,
        eval_interval: Some(every),
        checkpoint_interval: Some(if quick { steps } else { every }),
        eval_sequences: Some(eval_seqs),
        eval_batch: 4,
        seed: 17,
        ..RunSettings::default()
    };
    let mut prune = PrunePart {
        run: run(steps_p, every_p),
        ..PrunePart::default()
    };
    prune.dbl.exhaustion = shears_data::Exhaustion::Wrap;
    let mut train = TrainPart {
        run: run(steps_t, every_t),
        ..TrainPart::default()
    };
    train.optim.lr = 3e-4;
    train.dbl.exhaustion = shears_data::Exhaustion::Wrap;
    Ok(PipelinePlan {
        model: "smollm2".into(),
        out: out.to_path_buf(),
        data: DataSource::Plan(data),
        target: TargetShape {
            num_hidden_layers: 20,
            hidden_size: 384,
            num_attention_heads: 6,
            num_key_value_heads: 3,
            intermediate_size: 1024,
        },
        prune,
        train,
        eval: EvalPart {
            sequences: Some(eval_seqs),
            seq_len: Some(seq),
            batch: 4,
        },
        export: ExportPart::default(),
    })
}

/// `shears demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The few-minutes budget.
    #[arg(long)]
    pub quick: bool,
    /// Output directory (default: runs/demo or runs/demo-quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue an interrupted demo.
    #[arg(long)]
    pub resume: bool,
}

pub fn demo(backend: BackendKind, a: DemoArgs) -> Result<Ended> {
    let DemoArgs { quick, out, resume } = a;
    let cache = shears_core::hub::cache_dir();
    let out = out
        .unwrap_or_else(|| PathBuf::from("runs").join(if quick { "demo-quick" } else { "demo" }));
    shears_core::hub::resolve_model("smollm2", |m| eprintln!("{m}"))?;
    let corpus = cache.join("corpus").join("demo");
    if !corpus.join("plan.toml").exists() {
        eprintln!("fetching the demo corpus into {}", corpus.display());
        crate::data::fetch_demo(crate::data::FetchDemoArgs {
            out: Some(corpus.clone()),
            max_mb_per_source: crate::data::DEMO_MB_PER_SOURCE,
        })?;
    }
    let plan = demo_plan(&out, &corpus, quick)?;
    let text = toml::to_string(&plan)?;
    if out.join("stages.json").exists() && !resume {
        bail!(
            "{} already holds a demo run; pass --resume to continue it or --out to choose another directory",
            out.display()
        );
    }
    run_plan(backend, plan, text, resume, false)
}

/// The summary as a table.
fn render_summary(s: &shears_trainer::records::Summary) -> String {
    let mut out = String::new();
    let domains: Vec<&String> = s.source.per_domain_ppl.keys().collect();
    out.push_str(&format!("{:<22}", "model"));
    out.push_str(&format!("{:>13}", "params"));
    for d in &domains {
        out.push_str(&format!("{:>14}", d));
    }
    out.push('\n');
    for (name, m) in [
        ("source", &s.source),
        ("pruned", &s.pruned),
        ("pruned + trained", &s.trained),
    ] {
        out.push_str(&format!("{name:<22}{:>13}", m.params));
        for d in &domains {
            out.push_str(&format!(
                "{:>14.2}",
                m.per_domain_ppl.get(*d).copied().unwrap_or(f64::NAN)
            ));
        }
        out.push('\n');
    }
    out.push_str("(per-domain perplexity on the eval shards)\n");
    out.push_str(&format!("exported model: {}\n", s.export_dir.display()));
    out
}
