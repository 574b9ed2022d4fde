//! `shears run pipeline.toml`: prepare (if needed) → prune → finalize → continued pre-training
//! → per-domain evaluation before and after → export, each stage in its own directory under
//! `out`, resumable stage by stage. `shears demo` builds such a plan for SmolLM2 and the demo
//! corpus.

use shears_models::{ShearsAutodiff, ShearsOps};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shears_core::error::IoContext;
use shears_core::{DType, Error, ModelFiles, Result};
use shears_data::prepare::{DataPlan, Progress};
use shears_data::Dataset;
use shears_pruning::size::Dims;
use shears_pruning::{FinalizeOptions, TargetShape};

use crate::checkpoint;
use crate::config::{
    DblSettings, Faults, OptimSettings, PruneConfig, PruningSettings, RunSettings, TrainConfig,
};
use crate::driver::Outcome;
use crate::eval::{batch_tensor, domain_losses, summed_nll, DomainEval, EvalSettings};
use crate::jobs::{self, JobOptions};

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
    #[serde(skip_serializing_if = "is_default")]
    pub faults: Faults,
}

/// The continued pre-training stage of a pipeline. Its domain weights start from the pruning
/// run's final weights and its reference losses are the pruning run's, unless set here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainPart {
    pub run: RunSettings,
    pub optim: OptimSettings,
    pub dbl: DblSettings,
    #[serde(skip_serializing_if = "is_default")]
    pub faults: Faults,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
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

/// One model's line of the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub params: u64,
    pub config: Value,
    pub per_domain_ppl: BTreeMap<String, f64>,
    pub per_domain_loss: BTreeMap<String, f64>,
}

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub source: ModelSummary,
    pub pruned: ModelSummary,
    pub trained: ModelSummary,
    pub export_dir: PathBuf,
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

fn read_json(p: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(p).at(p, "cannot read")?;
    serde_json::from_str(&text).map_err(|e| Error::format(p, format!("invalid JSON: {e}")))
}

fn write_json(p: &Path, v: &impl Serialize) -> Result<()> {
    let tmp = p.with_extension("json.tmp");
    checkpoint::write_synced(
        &tmp,
        serde_json::to_string_pretty(v).expect("json").as_bytes(),
    )?;
    std::fs::rename(&tmp, p).at(p, "cannot rename into place")
}

/// Per-domain eval of a model (plain forward).
pub fn eval_model<B: ShearsOps>(
    files: &ModelFiles,
    data: &Dataset,
    s: &EvalSettings,
    device: &B::Device,
) -> Result<BTreeMap<String, DomainEval>> {
    let model = shears_models::load::from_files::<B>(files, device, DType::F32)?;
    domain_losses(data, s, |seqs| {
        let ids = batch_tensor::<B>(seqs, device);
        summed_nll(model.nll(ids))
    })
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
    done: serde_json::Map<String, Value>,
}

impl Stages {
    fn is_done(&self, s: &str) -> bool {
        self.done.contains_key(s)
    }
    fn mark(&mut self, s: &str, v: Value) -> Result<()> {
        self.done.insert(s.into(), v);
        write_json(&self.path, &self.done)
    }
}

fn log(msg: &str) {
    eprintln!("{msg}");
}

/// Run `plan` (its text is saved as given).
pub fn run_pipeline<B: ShearsAutodiff>(
    plan: &PipelinePlan,
    plan_text: &str,
    opts: &PipelineOptions,
    device: B::Device,
) -> Result<PipelineOutcome> {
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
    std::fs::create_dir_all(&lay.root).at(&lay.root, "cannot create")?;
    let saved_plan = lay.root.join("pipeline.toml");
    if saved_plan.exists() {
        let old = std::fs::read_to_string(&saved_plan).at(&saved_plan, "cannot read")?;
        if old != plan_text {
            return Err(Error::format(
                &saved_plan,
                "the plan differs from the one this pipeline was started with; resume with the same plan",
            ));
        }
    } else {
        checkpoint::write_synced(&saved_plan, plan_text.as_bytes())?;
    }
    let mut stages = Stages {
        done: if stages_path.exists() {
            match read_json(&stages_path)? {
                Value::Object(m) => m,
                _ => return Err(Error::format(&stages_path, "is not a JSON object")),
            }
        } else {
            serde_json::Map::new()
        },
        path: stages_path,
    };

    // 1. Data.
    let source_files = jobs::load_model(&plan.model)?;
    let data_dir = match &plan.data {
        DataSource::Prepared(p) => p.clone(),
        DataSource::Plan(dp) => {
            let t = Instant::now();
            let tok = if dp.tokenizer == plan.model {
                source_files.tokenizer()?.clone()
            } else {
                jobs::load_model(&dp.tokenizer)?.tokenizer()?.clone()
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
            lay.data()
        }
    };
    let data = jobs::open_data(&data_dir, &source_files, opts.allow_tokenizer_mismatch)?;
    let es = EvalSettings {
        sequences: plan.eval.sequences,
        seq_len: plan
            .eval
            .seq_len
            .unwrap_or(data.seq_len())
            .min(data.seq_len()),
        batch: plan.eval.batch.max(1),
    };

    // 2. Source evaluation.
    let inner = device.clone();
    let source_eval = cached_eval::<B::InnerBackend>(
        &mut stages,
        "eval_source",
        &source_files,
        &data,
        &es,
        &inner,
    )?;

    let stop = |stage: &'static str| {
        opts.interrupt
            .load(std::sync::atomic::Ordering::SeqCst)
            .then_some(PipelineOutcome::Interrupted { stage, step: 0 })
    };
    if let Some(o) = stop("eval source") {
        return Ok(o);
    }

    // 3. Pruning.
    let prune_cfg = PruneConfig {
        model: plan.model.clone(),
        data: data_dir.clone(),
        target: plan.target,
        run: plan.prune.run.clone(),
        optim: plan.prune.optim.clone(),
        pruning: plan.prune.pruning.clone(),
        dbl: plan.prune.dbl.clone(),
        faults: plan.prune.faults.clone(),
    };
    if !stages.is_done("prune") {
        let t = Instant::now();
        let mut resolved_prune_run = prune_cfg.run.clone();
        resolved_prune_run.resolve(crate::config::StageKind::Prune);
        let job = JobOptions {
            out: lay.prune(),
            plan_text: toml::to_string(&prune_cfg).expect("toml"),
            resume: opts.resume && lay.prune().join(crate::run_dir::RESOLVED).exists(),
            progress: opts.progress,
            echo: true,
            interrupt: opts.interrupt.clone(),
            allow_tokenizer_mismatch: opts.allow_tokenizer_mismatch,
            source_losses: (crate::driver::eval_settings(&resolved_prune_run, &data)? == es).then(
                || {
                    source_eval
                        .iter()
                        .map(|(k, v)| (k.clone(), v.loss))
                        .collect()
                },
            ),
        };
        log("== prune");
        match jobs::prune::<B>(&prune_cfg, &job, device.clone())? {
            Outcome::Finished { step, .. } => stages.mark(
                "prune",
                json!({"steps": step, "seconds": t.elapsed().as_secs_f64()}),
            )?,
            Outcome::Interrupted { step, .. } => {
                return Ok(PipelineOutcome::Interrupted {
                    stage: "prune",
                    step,
                })
            }
        }
    }

    // 4. Finalize.
    if let Some(o) = stop("prune") {
        return Ok(o);
    }
    if !stages.is_done("finalize") {
        log("== finalize");
        let r = jobs::finalize_run::<B::InnerBackend>(
            &lay.prune(),
            None,
            &lay.pruned(),
            plan.export.finalize,
            None,
            true,
            &inner,
        )?;
        stages.mark(
            "finalize",
            json!({"checkpoint": r.checkpoint, "params": r.pruned_params}),
        )?;
        log(&format!(
            "finalized {} → {} parameters into {}",
            r.source_params,
            r.pruned_params,
            r.out.display()
        ));
    }
    let pruned_files = ModelFiles::load_hf_dir(lay.pruned())?;
    if TargetShape::of(&pruned_files.config) != plan.target {
        return Err(Error::format(
            lay.pruned(),
            "the finalized model does not have the target shape",
        ));
    }
    let pruned_eval = cached_eval::<B::InnerBackend>(
        &mut stages,
        "eval_pruned",
        &pruned_files,
        &data,
        &es,
        &inner,
    )?;

    if let Some(o) = stop("eval pruned") {
        return Ok(o);
    }

    // 5. Continued pre-training.
    let mut dbl = plan.train.dbl.clone();
    if dbl.initial_weights.is_none() && dbl.initial_weights_from.is_none() {
        dbl.initial_weights_from = Some(lay.prune());
    }
    let train_cfg = TrainConfig {
        model: lay.pruned().display().to_string(),
        data: data_dir.clone(),
        from_scratch: false,
        run: plan.train.run.clone(),
        optim: plan.train.optim.clone(),
        dbl,
        faults: plan.train.faults.clone(),
    };
    if !stages.is_done("train") {
        let t = Instant::now();
        let job = JobOptions {
            out: lay.train(),
            plan_text: toml::to_string(&train_cfg).expect("toml"),
            resume: opts.resume && lay.train().join(crate::run_dir::RESOLVED).exists(),
            progress: opts.progress,
            echo: true,
            interrupt: opts.interrupt.clone(),
            allow_tokenizer_mismatch: opts.allow_tokenizer_mismatch,
            source_losses: None,
        };
        log("== train");
        match jobs::train::<B>(&train_cfg, &job, device.clone())? {
            Outcome::Finished { step, .. } => stages.mark(
                "train",
                json!({"steps": step, "seconds": t.elapsed().as_secs_f64()}),
            )?,
            Outcome::Interrupted { step, .. } => {
                return Ok(PipelineOutcome::Interrupted {
                    stage: "train",
                    step,
                })
            }
        }
    }

    if let Some(o) = stop("train") {
        return Ok(o);
    }

    // 6. Export the trained model.
    if !stages.is_done("export") {
        log("== export");
        let ckpt = jobs::find_checkpoint(&lay.train(), None)?;
        let files = ModelFiles::load_hf_dir(ckpt.join("model"))?;
        files.write_hf_dir(lay.export(), plan.export.dtype.or(Some(DType::F32)), true)?;
        stages.mark("export", json!({"checkpoint": ckpt}))?;
    }
    let trained_files = ModelFiles::load_hf_dir(lay.export())?;
    let trained_eval = cached_eval::<B::InnerBackend>(
        &mut stages,
        "eval_trained",
        &trained_files,
        &data,
        &es,
        &inner,
    )?;

    let summary = Summary {
        source: model_summary(&source_files, &source_eval),
        pruned: model_summary(&pruned_files, &pruned_eval),
        trained: model_summary(&trained_files, &trained_eval),
        export_dir: lay.export(),
    };
    write_json(&lay.root.join("summary.json"), &summary)?;
    Ok(PipelineOutcome::Done(Box::new(summary)))
}

fn cached_eval<B: ShearsOps>(
    stages: &mut Stages,
    key: &str,
    files: &ModelFiles,
    data: &Dataset,
    es: &EvalSettings,
    device: &B::Device,
) -> Result<BTreeMap<String, DomainEval>> {
    if let Some(v) = stages.done.get(key) {
        if let Ok(mut e) =
            serde_json::from_value::<BTreeMap<String, DomainEval>>(v["domains"].clone())
        {
            // serde_json's float parser can be one ulp off; the exact bits are kept beside the
            // numbers so a resumed pipeline reports exactly what an uninterrupted one does.
            for (domain, d) in e.iter_mut() {
                if let Some(bits) = v["loss_bits"][domain]
                    .as_str()
                    .and_then(|b| u64::from_str_radix(b, 16).ok())
                {
                    d.loss = f64::from_bits(bits);
                }
            }
            return Ok(e);
        }
    }
    log(&format!("== {}", key.replace('_', " ")));
    let t = Instant::now();
    let e = eval_model::<B>(files, data, es, device)?;
    let bits: BTreeMap<&String, String> = e
        .iter()
        .map(|(k, d)| (k, format!("{:016x}", d.loss.to_bits())))
        .collect();
    stages.mark(
        key,
        json!({"domains": e, "loss_bits": bits, "seconds": t.elapsed().as_secs_f64()}),
    )?;
    Ok(e)
}

fn model_summary(files: &ModelFiles, e: &BTreeMap<String, DomainEval>) -> ModelSummary {
    ModelSummary {
        params: Dims::of(&files.config).total(),
        config: json!({
            "num_hidden_layers": files.config.num_hidden_layers,
            "hidden_size": files.config.hidden_size,
            "num_attention_heads": files.config.num_attention_heads,
            "num_key_value_heads": files.config.num_kv_heads(),
            "intermediate_size": files.config.intermediate_size,
            "vocab_size": files.config.vocab_size,
        }),
        per_domain_ppl: e.iter().map(|(k, v)| (k.clone(), v.perplexity())).collect(),
        per_domain_loss: e.iter().map(|(k, v)| (k.clone(), v.loss)).collect(),
    }
}

/// The summary as a table.
pub fn render_summary(s: &Summary) -> String {
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
