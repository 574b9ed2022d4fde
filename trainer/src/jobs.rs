//! Whole stages as the CLI runs them: `prune`, `train` and `finalize` on a run directory.

use shears_models::{ShearsAutodiff, ShearsOps};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::Serialize;
use shears_core::fsutil::StagedDir;
use shears_core::{DType, Error, ModelFiles, Result};
use shears_data::dbl::DomainValues;
use shears_data::{Dataset, ReferenceSource};
use shears_pruning::size::Dims;
use shears_pruning::{finalize, FinalizeOptions};

use crate::calibrate;
use crate::checkpoint::Checkpoint;
use crate::config::{
    resolve_prune, resolve_train, CheckRanges, DblSettings, Faults, LoopSettings, MaskInit,
    OptimSettings, PruneConfig, RunSettings, StageKind, TrainConfig,
};
use crate::driver::{self, run_loop, LoopInputs, Outcome, Stage};
use crate::inputs::{
    load_model, load_prune_teacher, load_teacher, open_data, run_source_model, source_model_name,
    SOURCE_MODEL_KEY,
};
use crate::lm_stage::LmStage;
use crate::parallel::{rank_device, run_ranks, ParallelSettings, UntilEveryRank};
use crate::prune_stage::{PruneRates, PruneStage};
use crate::run_dir::RunDir;
use std::sync::Mutex;
use std::time::Duration;

/// How a stage is started.
#[derive(Clone)]
pub struct JobOptions {
    /// Run directory.
    pub out: PathBuf,
    /// The plan file's text, saved as given.
    pub plan_text: String,
    /// Continue from the newest checkpoint in `out`.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Echo the log to stderr.
    pub echo: bool,
    /// Set by SIGINT/SIGTERM.
    pub interrupt: Arc<AtomicBool>,
    /// Train on data whose tokenizer differs from the model's (`--allow-tokenizer-mismatch`).
    pub allow_tokenizer_mismatch: bool,
    /// Reference losses already measured (the pipeline's source evaluation, when it uses the
    /// same eval settings); used instead of measuring the source model again.
    pub source_losses: Option<DomainValues>,
}

/// Make SIGINT and SIGTERM set a flag instead of killing the process, so the loops can write
/// a checkpoint and exit cleanly.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    flag
}

/// The final domain weights and reference losses of a finished (or interrupted) run.
pub fn run_results(run: &Path) -> Result<(BTreeMap<String, f64>, DomainValues)> {
    let st = Checkpoint::find(run, None)?.state;
    Ok((st.sampler.weights, st.reference_losses))
}

fn start_weights(
    dbl: &DblSettings,
    data: &Dataset,
) -> Result<(BTreeMap<String, f64>, Option<DomainValues>)> {
    if let Some(run) = &dbl.initial_weights_from {
        let (w, r) = run_results(run)?;
        return Ok((w, Some(r)));
    }
    Ok((
        dbl.initial_weights
            .clone()
            .unwrap_or_else(|| driver::token_share(data)),
        None,
    ))
}

fn reference(
    dbl: &DblSettings,
    from_run: Option<DomainValues>,
    measured: Option<&DomainValues>,
) -> Result<Option<DomainValues>> {
    match &dbl.reference {
        ReferenceSource::SourceModel => Ok(from_run.or_else(|| measured.cloned())),
        other => other.resolve(None).map(Some),
    }
}

/// `shears prune`: run (or resume) the pruning stage.
pub fn prune<B: ShearsAutodiff>(
    config: &PruneConfig,
    job: &JobOptions,
    device: B::Device,
) -> Result<Outcome> {
    // Plan ranges first: a bad number costs no model load.
    config.check_ranges().map_err(Error::invalid)?;
    let files = load_model(&config.model)?;
    let (resolved, spec) = resolve_prune(config, &files.config)?;
    let data = open_data(&resolved.data, &files, job.allow_tokenizer_mismatch)?;
    let rates = PruneRates::of(&resolved);
    let parts = Parts {
        stage: StageKind::Prune,
        run: &resolved.run,
        optim: &resolved.optim,
        dbl: &resolved.dbl,
    };
    let seed = resolved.run.seed;
    let compute = resolved.run.compute(false);
    // An importance init, unless a checkpoint restores the masks.
    let resuming = job.resume && Checkpoint::find(&job.out, None).is_ok();
    let importance = match resolved.pruning.init {
        MaskInit::Importance if !resuming => Some(calibrate::importance::<B::InnerBackend>(
            &resolved.pruning,
            &files,
            &data,
            &job.out,
            &device,
        )?),
        _ => None,
    };
    let init = importance.as_ref().map(|(imp, _)| imp.log_alphas(&spec));
    let teacher = load_prune_teacher(&resolved, &files, &data)?;
    // The teacher's host weights, freed once every rank holds its copy.
    let teacher = UntilEveryRank::new(teacher, resolved.run.devices);
    // Every rank starts from the same weights and the same mask initialisation (`seed`, or the
    // importance ranking).
    let outcome = run_stage(
        job,
        &toml::to_string(&resolved).expect("toml"),
        parts,
        &data,
        device,
        files.clone(),
        |files, device| {
            let stage =
                PruneStage::<B>::new_with(files, &spec, rates, seed, init.as_ref(), device)?
                    .with_compute(compute);
            teacher.use_once(|t| match t {
                Some((spec, alpha, t)) => stage.with_teacher(t, *spec, *alpha),
                None => Ok(stage),
            })
        },
    )?;
    // The scores stay with the run (a resume or another target reads them back).
    if let Some((imp, true)) = &importance {
        imp.save(&job.out.join(calibrate::IMPORTANCE_FILE), &files.config)?;
    }
    Ok(outcome)
}

/// `shears train`: run (or resume) continued pre-training.
pub fn train<B: ShearsAutodiff>(
    config: &TrainConfig,
    job: &JobOptions,
    device: B::Device,
) -> Result<Outcome> {
    let resolved = resolve_train(config)?;
    let mut files = load_model(&config.model)?;
    if resolved.from_scratch {
        files.weights = shears_models::load::random_weights(&files.config, resolved.run.seed);
    }
    let data = open_data(&resolved.data, &files, job.allow_tokenizer_mismatch)?;
    let parts = Parts {
        stage: StageKind::Train,
        run: &resolved.run,
        optim: &resolved.optim,
        dbl: &resolved.dbl,
    };
    let adamw = resolved.optim.adamw();
    let compute = resolved.run.compute(false);
    let teacher = load_teacher(&resolved, &files, &data)?;
    // The teacher's host weights, freed once every rank holds its copy.
    let teacher = UntilEveryRank::new(teacher, resolved.run.devices);
    run_stage(
        job,
        &toml::to_string(&resolved).expect("toml"),
        parts,
        &data,
        device,
        files,
        |files, device| {
            let stage = LmStage::<B>::new(files, adamw, device)?.with_compute(compute);
            teacher.use_once(|t| match t {
                Some((spec, alpha, t)) => stage.with_teacher(t, *spec, *alpha),
                None => Ok(stage),
            })
        },
    )
}

/// The settings both stage plans share.
struct Parts<'a> {
    stage: StageKind,
    run: &'a RunSettings,
    optim: &'a OptimSettings,
    dbl: &'a DblSettings,
}

/// Open the run directory (before the model is built, so an existing run is refused early),
/// build the stage on every rank (`make_stage` from the host weights `files`, which are freed
/// once every rank holds its copy) and run the loop on `p.run.devices` ranks.
fn run_stage<B: ShearsAutodiff, S: Stage<B>>(
    job: &JobOptions,
    resolved: &str,
    p: Parts<'_>,
    data: &Dataset,
    device: B::Device,
    files: ModelFiles,
    make_stage: impl Fn(&ModelFiles, &B::Device) -> Result<S> + Sync,
) -> Result<Outcome> {
    let n = p.run.devices;
    // On the CPU backends every rank shares the one CPU device, with a share of the threads:
    // each needs one of its own, or N replicas of the model crowd a few cores.
    let threads = rayon::current_num_threads();
    if n > threads && rank_device::<B>(&device, 1) == device {
        return Err(Error::invalid(format!(
            "run.devices = {n}: on the CPU backends each rank needs a CPU thread of its own and \
             {threads} are available (--threads); use at most {threads}"
        )));
    }
    let dir = RunDir::open(&job.out, &job.plan_text, resolved, job.resume)?;
    let (initial_weights, from_run) = start_weights(p.dbl, data)?;
    let faults = Faults::from_env()?;
    let settings = LoopSettings::new(p.stage, p.run, p.optim, data)?;
    let inputs = LoopInputs {
        settings: &settings,
        dbl: p.dbl,
        faults: &faults,
        data,
        initial_weights,
        reference: reference(p.dbl, from_run, job.source_losses.as_ref())?,
        interrupt: job.interrupt.clone(),
        progress: job.progress,
    };
    let files = UntilEveryRank::new(files, n);
    let build = |device: &B::Device| -> Result<S> { files.use_once(|f| make_stage(f, device)) };
    let leader = Mutex::new(Some(dir));
    let settings = ParallelSettings {
        devices: n,
        timeout: Duration::from_secs_f64(p.run.collective_timeout_s),
    };
    run_ranks::<B::InnerBackend, _>(
        settings,
        |rank| rank_device::<B>(&device, rank),
        |comm, device| {
            let mut dir = if comm.is_leader() {
                let mut d = leader
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .expect("one leader");
                d.echo = job.echo;
                if n > 1 {
                    d.log(&format!(
                        "data parallel: {n} ranks, {} CPU thread(s) each; rank 0 writes the run",
                        rayon::current_num_threads()
                    ));
                }
                d
            } else {
                RunDir::follower_of(&job.out)
            };
            let mut stage = build(&device)?;
            run_loop(&mut stage, &inputs, &mut dir, job.resume, &comm)
        },
    )
}

/// What `shears finalize` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct FinalizeReport {
    pub checkpoint: PathBuf,
    pub step: usize,
    pub out: PathBuf,
    pub source_params: u64,
    pub pruned_params: u64,
    pub config: shears_core::LlamaConfig,
}

/// `shears prune` with `method = "importance"`: measure (or read) the source's activation
/// importance, keep each mask row's top-k as exact 0/1 masks, and write the dense model of the
/// target to `out` with `masks.safetensors` and `importance.safetensors` (method §12).
pub fn prune_one_shot<B: ShearsOps>(
    config: &PruneConfig,
    out: &Path,
    overwrite: bool,
    allow_tokenizer_mismatch: bool,
    device: &B::Device,
) -> Result<FinalizeReport> {
    config.check_ranges().map_err(Error::invalid)?;
    shears_core::fsutil::check_output_apart(
        out,
        [
            ("data", config.data.as_path()),
            ("model", Path::new(&config.model)),
        ],
    )?;
    let files = load_model(&config.model)?;
    let (resolved, spec) = resolve_prune(config, &files.config)?;
    let data = open_data(&resolved.data, &files, allow_tokenizer_mismatch)?;
    let (imp, _) = calibrate::importance::<B>(&resolved.pruning, &files, &data, out, device)?;
    let masks = imp.masks(&spec);
    let (pruned_config, weights) = finalize(&files.weights, &masks, FinalizeOptions::default())?;
    let mut pruned = files.clone();
    pruned.config = pruned_config.clone();
    pruned.layers = pruned.config.uniform_layer_shapes();
    pruned.weights = weights;
    let stage = StagedDir::new(out, overwrite)?;
    pruned.write_hf_dir(stage.path(), None, true)?;
    let meta: BTreeMap<String, String> = [
        ("method".to_string(), "importance".to_string()),
        (
            SOURCE_MODEL_KEY.to_string(),
            source_model_name(&config.model),
        ),
    ]
    .into();
    shears_core::formats::safetensors::write(
        stage.path().join("masks.safetensors"),
        &masks.to_weight_map(),
        &meta,
    )?;
    imp.save(
        &stage.path().join(calibrate::IMPORTANCE_FILE),
        &files.config,
    )?;
    let out = stage.commit()?;
    Ok(FinalizeReport {
        checkpoint: out.clone(),
        step: 0,
        out,
        source_params: Dims::of(&files.config).total(),
        pruned_params: Dims::of(&pruned_config).total(),
        config: pruned_config,
    })
}

/// `shears finalize`: fold a pruning checkpoint's deterministic masks into its weights and
/// write the dense model of exactly the target shape, with `masks.safetensors` (the masks and
/// `log_alpha`s) next to it.
pub fn finalize_run<B: ShearsOps>(
    run: &Path,
    step: Option<usize>,
    out: &Path,
    opts: FinalizeOptions,
    dtype: Option<DType>,
    overwrite: bool,
    device: &B::Device,
) -> Result<FinalizeReport> {
    shears_core::fsutil::check_output_apart(out, [("run directory", run)])?;
    let ckpt = Checkpoint::find(run, step)?;
    let files = ckpt.model_files()?;
    let spec = ckpt.pruning_spec(&files)?;
    let (masks, _) = ckpt.masks::<B>(&spec, device)?;
    let st = &ckpt.state;
    let masks = masks.clamped();
    let host = masks.deterministic(true);
    let (config, weights) = finalize(&files.weights, &host, opts)?;
    let mut pruned = files.clone();
    pruned.config = config.clone();
    pruned.layers = pruned.config.uniform_layer_shapes();
    pruned.weights = weights;
    let stage = StagedDir::new(out, overwrite)?;
    pruned.write_hf_dir(stage.path(), dtype, true)?;
    let mut mask_map = host.to_weight_map();
    for (m, t) in masks.log_alphas() {
        mask_map.insert(
            format!("log_alpha.{}", m.name()),
            shears_models::load::host_of(t, DType::F32),
        );
    }
    let mut meta: BTreeMap<String, String> = [
        ("checkpoint".to_string(), ckpt.dir.display().to_string()),
        ("step".to_string(), st.step.to_string()),
    ]
    .into();
    if let Some(source) = run_source_model(run) {
        meta.insert(SOURCE_MODEL_KEY.to_string(), source);
    }
    shears_core::formats::safetensors::write(
        stage.path().join("masks.safetensors"),
        &mask_map,
        &meta,
    )?;
    let out = stage.commit()?;
    Ok(FinalizeReport {
        checkpoint: ckpt.dir.clone(),
        step: st.step,
        out,
        source_params: Dims::of(&files.config).total(),
        pruned_params: Dims::of(&config).total(),
        config,
    })
}
