//! `shears run pipeline.toml`: prepare (if needed) → prune → finalize → continued pre-training
//! → per-domain evaluation before and after → export, each stage in its own directory under
//! `out`, resumable stage by stage. `shears demo` builds such a plan for SmolLM2 and the demo
//! corpus.

use shears_models::{ShearsAutodiff, ShearsOps};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use shears_core::error::IoContext;
use shears_core::{DType, Error, ModelFiles, Result};
use shears_data::prepare::{DataPlan, Progress};
use shears_data::Dataset;
use shears_pruning::size::Dims;
use shears_pruning::{FinalizeOptions, TargetShape};

use crate::config::{
    DblSettings, DistillSettings, OptimSettings, PruneConfig, PruneMethod, PruningSettings,
    RunSettings, TrainConfig, SOURCE_TEACHER,
};
use crate::driver::Outcome;
use crate::jobs::{self, JobOptions};
use crate::records::{
    self, ModelSummary, PipelineStage, ShapeSummary, StageDone, StagesFile, Summary,
};
use shears_eval::domain::{DomainEval, EvalSettings};

/// Where the data comes from: a prepared directory, or a data plan prepared into `out/data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DataSource {
    Prepared(PathBuf),
    Plan(DataPlan),
}

/// The pruning stage of a pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrunePart {
    pub run: RunSettings,
    pub optim: OptimSettings,
    pub pruning: PruningSettings,
    pub dbl: DblSettings,
    /// Distillation while pruning (`[prune.distill]`; `teacher = "source"`: the source).
    pub distill: DistillSettings,
}

/// The continued pre-training stage of a pipeline. Its domain weights start from the pruning
/// run's final weights and its reference losses are the pruning run's, unless set here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainPart {
    pub run: RunSettings,
    pub optim: OptimSettings,
    pub dbl: DblSettings,
    /// Distillation; `teacher = "source"` is the pipeline's `model`.
    #[serde(skip_serializing_if = "DistillSettings::is_off")]
    pub distill: DistillSettings,
}

/// The before/after evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalPart {
    /// Eval sequences per domain (default: all).
    pub sequences: Option<usize>,
    /// Tokens per sequence (default: the data's).
    pub seq_len: Option<usize>,
    /// Sequences per forward.
    pub batch: usize,
}

impl Default for EvalPart {
    fn default() -> Self {
        EvalPart {
            sequences: None,
            seq_len: None,
            batch: 8,
        }
    }
}

/// The exported model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportPart {
    /// Weight dtype of the export (default f32).
    pub dtype: Option<DType>,
    /// Finalize options (the reference's LM-head scaling, off by default).
    pub finalize: FinalizeOptions,
}

/// A whole pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelinePlan {
    /// Source model: HF directory, `.gguf` or known name.
    pub model: String,
    /// Output directory; stages write `data/`, `prune/`, `pruned/`, `train/`, `export/`,
    /// `eval.json` and `summary.json` under it.
    pub out: PathBuf,
    /// A prepared data directory, or a `[data]` plan to prepare.
    pub data: DataSource,
    /// Target shape.
    pub target: TargetShape,
    #[serde(default)]
    pub prune: PrunePart,
    #[serde(default)]
    pub train: TrainPart,
    #[serde(default)]
    pub eval: EvalPart,
    #[serde(default)]
    pub export: ExportPart,
}

impl crate::config::CheckRanges for PipelinePlan {
    fn check_ranges(&self) -> std::result::Result<(), String> {
        if let DataSource::Plan(d) = &self.data {
            d.validate().map_err(|m| format!("data: {m}"))?;
        }
        self.prune.run.check_ranges("prune.run")?;
        self.prune.optim.check_ranges("prune.optim")?;
        self.prune.pruning.check_ranges("prune.pruning")?;
        self.prune.dbl.check_ranges("prune.dbl")?;
        self.train.run.check_ranges("train.run")?;
        self.train.optim.check_ranges("train.optim")?;
        self.train.dbl.check_ranges("train.dbl")?;
        self.train.distill.check_ranges("train.distill")?;
        let e = &self.eval;
        if e.batch == 0 || e.batch > crate::config::limits::BATCH || e.sequences == Some(0) {
            return Err(format!(
                "eval.batch ({}) and eval.sequences must be at least 1 (batch at most {})",
                e.batch,
                crate::config::limits::BATCH
            ));
        }
        if matches!(e.seq_len, Some(n) if !(2..=crate::config::limits::SEQ_LEN).contains(&n)) {
            return Err(format!(
                "eval.seq_len = {} must be between 2 and {} tokens",
                e.seq_len.unwrap_or(0),
                crate::config::limits::SEQ_LEN
            ));
        }
        Ok(())
    }
}

/// Where each stage writes.
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn prune(&self) -> PathBuf {
        self.root.join("prune")
    }
    pub fn pruned(&self) -> PathBuf {
        self.root.join("pruned")
    }
    pub fn train(&self) -> PathBuf {
        self.root.join("train")
    }
    pub fn export(&self) -> PathBuf {
        self.root.join("export")
    }
    fn stages(&self) -> PathBuf {
        self.root.join("stages.json")
    }
}

fn write_json(p: &Path, v: &impl Serialize) -> Result<()> {
    shears_core::fsutil::write_atomic(
        p,
        serde_json::to_string_pretty(v).expect("json").as_bytes(),
        true,
    )
}

/// Progress reporting of the pipeline.
pub struct PipelineOptions {
    pub resume: bool,
    pub progress: bool,
    pub interrupt: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Use data tokenized with another tokenizer than the model's.
    pub allow_tokenizer_mismatch: bool,
}

/// How a pipeline ended.
#[derive(Debug)]
pub enum PipelineOutcome {
    Done(Box<Summary>),
    Interrupted { stage: &'static str, step: usize },
}

struct Stages {
    path: PathBuf,
    done: StagesFile,
}

impl Stages {
    fn is_done(&self, s: PipelineStage) -> bool {
        self.done.0.contains_key(&s)
    }
    fn mark(&mut self, s: PipelineStage, v: StageDone) -> Result<()> {
        self.done.0.insert(s, v);
        write_json(&self.path, &self.done)
    }
}

fn log(msg: &str) {
    eprintln!("{msg}");
}

/// What a pipeline stage needs, and what earlier stages left for later ones.
struct PipelineRun<'a, B: ShearsAutodiff> {
    plan: &'a PipelinePlan,
    opts: &'a PipelineOptions,
    lay: Layout,
    stages: Stages,
    device: B::Device,
    source_files: ModelFiles,
    data_dir: PathBuf,
    data: Dataset,
    es: EvalSettings,
    /// Per-domain evaluations of the source, pruned and trained models, as they are done.
    evals: BTreeMap<PipelineStage, (ModelFiles, BTreeMap<String, DomainEval>)>,
}

/// Run `plan` (its text is saved as given): every [`PipelineStage`] in order, skipping those
/// `stages.json` records as done, stopping between stages on SIGINT/SIGTERM.
pub fn run_pipeline<B: ShearsAutodiff>(
    plan: &PipelinePlan,
    plan_text: &str,
    opts: &PipelineOptions,
    device: B::Device,
) -> Result<PipelineOutcome> {
    let mut run = PipelineRun::<B>::open(plan, plan_text, opts, device)?;
    let mut previous: Option<PipelineStage> = None;
    for stage in PipelineStage::ALL {
        if let Some(p) = previous {
            if opts.interrupt.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(PipelineOutcome::Interrupted {
                    stage: p.name(),
                    step: 0,
                });
            }
        }
        if let Some(interrupted) = run.stage(stage)? {
            return Ok(interrupted);
        }
        previous = Some(stage);
    }
    run.summary()
}

impl<'a, B: ShearsAutodiff> PipelineRun<'a, B> {
    /// Check the plan, take the output directory (or resume in it) and get the data ready.
    fn open(
        plan: &'a PipelinePlan,
        plan_text: &str,
        opts: &'a PipelineOptions,
        device: B::Device,
    ) -> Result<Self> {
        crate::config::CheckRanges::check_ranges(plan).map_err(Error::invalid)?;
        let lay = Layout {
            root: plan.out.clone(),
        };
        let stages_path = lay.stages();
        if stages_path.exists() && !opts.resume {
            return Err(Error::format(
                &plan.out,
                "already holds a pipeline run; pass --resume to continue it or choose another output directory",
            ));
        }
        let saved_plan = lay.root.join("pipeline.toml");
        // Like a stage's run directory: a pipeline writes only into a new or empty directory
        // or one of its own (with pipeline.toml), never beside someone else's files, and never
        // into what it reads.
        if lay.root.exists() && !saved_plan.exists() {
            let foreign = std::fs::read_dir(&lay.root)
                .at(&lay.root, "cannot list")?
                .next()
                .is_some();
            if foreign {
                return Err(Error::format(
                    &lay.root,
                    "exists and is not a pipeline directory (no pipeline.toml); Shears writes a pipeline only into a new or empty directory, so choose another out",
                ));
            }
        }
        let mut inputs = vec![("model", PathBuf::from(&plan.model))];
        match &plan.data {
            DataSource::Prepared(p) => inputs.push(("data", p.clone())),
            DataSource::Plan(dp) => inputs.extend(
                dp.domains
                    .values()
                    .flat_map(|d| d.inputs.iter())
                    .filter(|i| !i.contains(['*', '?', '[']))
                    .map(|i| ("corpus input", PathBuf::from(i))),
            ),
        }
        let existing: Vec<(&str, &Path)> = inputs
            .iter()
            .filter(|(_, p)| p.exists())
            .map(|(w, p)| (*w, p.as_path()))
            .collect();
        shears_core::fsutil::check_output_apart(&lay.root, existing)?;
        std::fs::create_dir_all(&lay.root).at(&lay.root, "cannot create")?;
        if saved_plan.exists() {
            let old = shears_core::fsutil::read_text(
                &saved_plan,
                shears_core::fsutil::SETTINGS_FILE_BYTES,
            )?;
            if old != plan_text {
                return Err(Error::format(
                    &saved_plan,
                    "the plan differs from the one this pipeline was started with; resume with the same plan",
                ));
            }
        } else {
            shears_core::fsutil::write_atomic(&saved_plan, plan_text.as_bytes(), true)?;
        }
        let stages = Stages {
            done: if stages_path.exists() {
                StagesFile::read(&stages_path)?
            } else {
                StagesFile::default()
            },
            path: stages_path,
        };
        let source_files = crate::inputs::load_model(&plan.model)?;
        let data_dir = prepare_data(plan, &lay, &source_files)?;
        let data =
            crate::inputs::open_data(&data_dir, &source_files, opts.allow_tokenizer_mismatch)?;
        let es = EvalSettings {
            sequences: plan.eval.sequences,
            seq_len: plan
                .eval
                .seq_len
                .unwrap_or(data.seq_len())
                .min(data.seq_len()),
            batch: plan.eval.batch.max(1),
        };
        Ok(PipelineRun {
            plan,
            opts,
            lay,
            stages,
            device,
            source_files,
            data_dir,
            data,
            es,
            evals: BTreeMap::new(),
        })
    }

    /// Run (or, when done before, read back) one stage; `Some` when it was interrupted.
    fn stage(&mut self, stage: PipelineStage) -> Result<Option<PipelineOutcome>> {
        match stage {
            PipelineStage::EvalSource => self.evaluate(stage, self.source_files.clone())?,
            PipelineStage::Prune => return self.prune(),
            PipelineStage::Finalize => self.finalize()?,
            PipelineStage::EvalPruned => {
                let pruned = ModelFiles::load_hf_dir(self.lay.pruned())?;
                if TargetShape::of(&pruned.config) != self.plan.target {
                    return Err(Error::format(
                        self.lay.pruned(),
                        "the finalized model does not have the target shape",
                    ));
                }
                self.evaluate(stage, pruned)?
            }
            PipelineStage::Train => return self.train(),
            PipelineStage::Export => self.export()?,
            PipelineStage::EvalTrained => {
                let trained = ModelFiles::load_hf_dir(self.lay.export())?;
                self.evaluate(stage, trained)?
            }
        }
        Ok(None)
    }

    fn evaluate(&mut self, stage: PipelineStage, files: ModelFiles) -> Result<()> {
        let inner = self.device.clone();
        let e = cached_eval::<B::InnerBackend>(
            &mut self.stages,
            stage,
            &files,
            &self.data,
            &self.es,
            &inner,
        )?;
        self.evals.insert(stage, (files, e));
        Ok(())
    }

    fn job(&self, out: PathBuf, plan_text: String) -> JobOptions {
        JobOptions {
            resume: self.opts.resume && out.join(crate::run_dir::RESOLVED).exists(),
            out,
            plan_text,
            progress: self.opts.progress,
            echo: true,
            interrupt: self.opts.interrupt.clone(),
            allow_tokenizer_mismatch: self.opts.allow_tokenizer_mismatch,
            source_losses: None,
        }
    }

    /// Record a finished loop, or report where it was interrupted.
    fn loop_ended(
        &mut self,
        stage: PipelineStage,
        outcome: Outcome,
        started: Instant,
    ) -> Result<Option<PipelineOutcome>> {
        match outcome {
            Outcome::Finished { step, .. } => {
                self.stages.mark(
                    stage,
                    StageDone::Loop {
                        steps: step,
                        seconds: started.elapsed().as_secs_f64(),
                    },
                )?;
                Ok(None)
            }
            Outcome::Interrupted { step, .. } => Ok(Some(PipelineOutcome::Interrupted {
                stage: stage.name(),
                step,
            })),
        }
    }

    fn prune(&mut self) -> Result<Option<PipelineOutcome>> {
        if self.stages.is_done(PipelineStage::Prune) {
            return Ok(None);
        }
        let plan = self.plan;
        let cfg = PruneConfig {
            model: plan.model.clone(),
            data: self.data_dir.clone(),
            target: plan.target,
            run: plan.prune.run.clone(),
            optim: plan.prune.optim.clone(),
            pruning: plan.prune.pruning.clone(),
            dbl: plan.prune.dbl.clone(),
            distill: plan.prune.distill.clone(),
        };
        let t = Instant::now();
        if cfg.pruning.method == PruneMethod::Importance {
            return self.prune_one_shot(&cfg, t).map(|()| None);
        }
        let mut resolved_run = cfg.run.clone();
        resolved_run.resolve(crate::config::StageKind::Prune);
        let mut job = self.job(self.lay.prune(), toml::to_string(&cfg).expect("toml"));
        // The source's eval losses are the reference losses when the stage evaluates alike.
        if crate::config::eval_settings(&resolved_run, &self.data)? == self.es {
            job.source_losses = self
                .evals
                .get(&PipelineStage::EvalSource)
                .map(|(_, e)| e.iter().map(|(k, v)| (k.clone(), v.loss)).collect());
        }
        log("== prune");
        let outcome = jobs::prune::<B>(&cfg, &job, self.device.clone())?;
        self.loop_ended(PipelineStage::Prune, outcome, t)
    }

    /// One-shot pruning (method §12): the dense model straight into `pruned/`, which is then
    /// the finalize stage's output too.
    fn prune_one_shot(&mut self, cfg: &PruneConfig, t: Instant) -> Result<()> {
        log("== prune (one shot, by activation importance)");
        let r = jobs::prune_one_shot::<B::InnerBackend>(
            cfg,
            &self.lay.pruned(),
            true,
            self.opts.allow_tokenizer_mismatch,
            &self.device.clone(),
        )?;
        let seconds = t.elapsed().as_secs_f64();
        self.stages
            .mark(PipelineStage::Prune, StageDone::Loop { steps: 0, seconds })?;
        self.stages.mark(
            PipelineStage::Finalize,
            StageDone::Finalized {
                checkpoint: r.out.clone(),
                params: r.pruned_params,
            },
        )?;
        log(&format!(
            "pruned {} → {} parameters into {} in {seconds:.1} s",
            r.source_params,
            r.pruned_params,
            r.out.display()
        ));
        Ok(())
    }

    fn finalize(&mut self) -> Result<()> {
        if self.stages.is_done(PipelineStage::Finalize) {
            return Ok(());
        }
        log("== finalize");
        let inner = self.device.clone();
        let r = jobs::finalize_run::<B::InnerBackend>(
            &self.lay.prune(),
            None,
            &self.lay.pruned(),
            self.plan.export.finalize,
            None,
            true,
            &inner,
        )?;
        self.stages.mark(
            PipelineStage::Finalize,
            StageDone::Finalized {
                checkpoint: r.checkpoint.clone(),
                params: r.pruned_params,
            },
        )?;
        log(&format!(
            "finalized {} → {} parameters into {}",
            r.source_params,
            r.pruned_params,
            r.out.display()
        ));
        Ok(())
    }

    fn train(&mut self) -> Result<Option<PipelineOutcome>> {
        if self.stages.is_done(PipelineStage::Train) {
            return Ok(None);
        }
        let plan = self.plan;
        let mut dbl = plan.train.dbl.clone();
        // The pruning run's final domain weights, when it ran a loop (one shot has none).
        let looped = plan.prune.pruning.method == PruneMethod::L0;
        if dbl.initial_weights.is_none() && dbl.initial_weights_from.is_none() && looped {
            dbl.initial_weights_from = Some(self.lay.prune());
        }
        let cfg = TrainConfig {
            model: self.lay.pruned().display().to_string(),
            data: self.data_dir.clone(),
            from_scratch: false,
            run: plan.train.run.clone(),
            optim: plan.train.optim.clone(),
            dbl,
            distill: DistillSettings {
                teacher: plan.train.distill.teacher.as_ref().map(|t| {
                    if t == SOURCE_TEACHER {
                        plan.model.clone()
                    } else {
                        t.clone()
                    }
                }),
                ..plan.train.distill.clone()
            },
        };
        let t = Instant::now();
        let job = self.job(self.lay.train(), toml::to_string(&cfg).expect("toml"));
        log("== train");
        let outcome = jobs::train::<B>(&cfg, &job, self.device.clone())?;
        self.loop_ended(PipelineStage::Train, outcome, t)
    }

    fn export(&mut self) -> Result<()> {
        if self.stages.is_done(PipelineStage::Export) {
            return Ok(());
        }
        log("== export");
        let ckpt = crate::checkpoint::Checkpoint::find(&self.lay.train(), None)?;
        let files = ckpt.model_files()?;
        files.write_hf_dir(
            self.lay.export(),
            self.plan.export.dtype.or(Some(DType::F32)),
            true,
        )?;
        self.stages.mark(
            PipelineStage::Export,
            StageDone::Exported {
                checkpoint: ckpt.dir,
            },
        )
    }

    /// `summary.json` from the three evaluations.
    fn summary(mut self) -> Result<PipelineOutcome> {
        let mut take = |s: PipelineStage| {
            self.evals
                .remove(&s)
                .ok_or_else(|| Error::invalid(format!("the pipeline has no '{}' result", s.name())))
        };
        let (source, pruned, trained) = (
            take(PipelineStage::EvalSource)?,
            take(PipelineStage::EvalPruned)?,
            take(PipelineStage::EvalTrained)?,
        );
        let summary = Summary {
            source: model_summary(&source.0, &source.1),
            pruned: model_summary(&pruned.0, &pruned.1),
            trained: model_summary(&trained.0, &trained.1),
            export_dir: self.lay.export(),
        };
        write_json(&self.lay.root.join("summary.json"), &summary)?;
        Ok(PipelineOutcome::Done(Box::new(summary)))
    }
}

/// The pipeline's data: a prepared directory as given, or prepared now from the plan's
/// sources (skipped when up to date).
fn prepare_data(plan: &PipelinePlan, lay: &Layout, source: &ModelFiles) -> Result<PathBuf> {
    match &plan.data {
        DataSource::Prepared(p) => Ok(p.clone()),
        DataSource::Plan(dp) => {
            let t = Instant::now();
            let tok = if dp.tokenizer == plan.model {
                source.tokenizer()?.clone()
            } else {
                crate::inputs::load_model(&dp.tokenizer)?
                    .tokenizer()?
                    .clone()
            };
            let noop = |_p: Progress| {};
            let outcome = shears_data::prepare(dp, &tok, &dp.tokenizer, &lay.data(), false, &noop)?;
            if !outcome.up_to_date {
                log(&format!(
                    "prepared the data in {:.1}s into {}",
                    t.elapsed().as_secs_f64(),
                    lay.data().display()
                ));
            }
            Ok(lay.data())
        }
    }
}

fn cached_eval<B: ShearsOps>(
    stages: &mut Stages,
    key: PipelineStage,
    files: &ModelFiles,
    data: &Dataset,
    es: &EvalSettings,
    device: &B::Device,
) -> Result<BTreeMap<String, DomainEval>> {
    if let Some(e) = stages.done.0.get(&key).and_then(records::evaluation) {
        return Ok(e);
    }
    log(&format!("== {}", key.name()));
    let t = Instant::now();
    let e = shears_eval::domain::eval_model::<B>(files, data, es, device)?;
    stages.mark(key, records::evaluated(&e, t.elapsed().as_secs_f64()))?;
    Ok(e)
}

fn model_summary(files: &ModelFiles, e: &BTreeMap<String, DomainEval>) -> ModelSummary {
    ModelSummary {
        params: Dims::of(&files.config).total(),
        config: ShapeSummary {
            num_hidden_layers: files.config.num_hidden_layers,
            hidden_size: files.config.hidden_size,
            num_attention_heads: files.config.num_attention_heads,
            num_key_value_heads: files.config.num_kv_heads(),
            intermediate_size: files.config.intermediate_size,
            vocab_size: files.config.vocab_size,
        },
        per_domain_ppl: e.iter().map(|(k, v)| (k.clone(), v.perplexity())).collect(),
        per_domain_loss: e.iter().map(|(k, v)| (k.clone(), v.loss)).collect(),
    }
}
