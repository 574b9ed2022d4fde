//! Whole stages as the CLI runs them: `prune`, `train` and `finalize` on a run directory.

use shears_models::{ShearsAutodiff, ShearsOps};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::Serialize;
use shears_core::fsutil::StagedDir;
use shears_core::{hub, DType, Error, ModelFiles, Result};
use shears_data::dbl::DomainValues;
use shears_data::{Dataset, ReferenceSource};
use shears_pruning::size::Dims;
use shears_pruning::{finalize, FinalizeOptions, PruningSpec};

use crate::checkpoint::Checkpoint;
use crate::config::{
    CheckRanges, DblSettings, Faults, OptimSettings, PruneConfig, RunSettings, StageKind,
    TrainConfig, SOURCE_TEACHER,
};
use crate::driver::{self, run_loop, LoopInputs, Outcome, Stage};
use crate::lm_stage::LmStage;
use crate::parallel::{run_ranks, ParallelSettings};
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

/// Load a model argument (HF directory, `.gguf`, known name).
pub fn load_model(arg: &str) -> Result<ModelFiles> {
    let path = hub::resolve_model(arg, |m| eprintln!("{m}"))?;
    ModelFiles::load(&path)
}

/// Open a prepared dataset for `files`' model: refused when its ids can reach past the model's
/// vocabulary or its sequences past the model's positions, and when it was tokenized with
/// another tokenizer than the model's (the manifest's sha256 of `tokenizer.json` against the
/// model's) unless `allow_tokenizer_mismatch`. A model without a tokenizer cannot be compared:
/// that is a warning.
pub fn open_data(
    path: &Path,
    files: &ModelFiles,
    allow_tokenizer_mismatch: bool,
) -> Result<Dataset> {
    let data = Dataset::open(path)?;
    let tok = &data.manifest.tokenizer;
    match &files.tokenizer {
        Some(t) => {
            let model_sha = shears_data::prepare::tokenizer_sha256(t);
            if model_sha != tok.sha256 {
                let msg = format!(
                    "was tokenized with '{}' (tokenizer.json sha256 {}) but the model {} has another tokenizer (sha256 {})",
                    tok.source,
                    short(&tok.sha256),
                    files.source.display(),
                    short(&model_sha),
                );
                if !allow_tokenizer_mismatch {
                    return Err(Error::format(
                        path,
                        format!(
                            "{msg}; prepare the data with the model's tokenizer, or pass --allow-tokenizer-mismatch if you know the two vocabularies agree"
                        ),
                    ));
                }
                eprintln!("warning: {}: {msg} (allowed by --allow-tokenizer-mismatch)", path.display());
            }
        }
        None => eprintln!(
            "warning: the model {} has no tokenizer.json, so the tokenizer of {} ('{}') cannot be checked against it",
            files.source.display(),
            path.display(),
            tok.source
        ),
    }
    let max = files.config.max_position_embeddings;
    if data.seq_len() > max {
        return Err(Error::format(
            path,
            format!(
                "holds sequences of {} tokens, more than the model's max_position_embeddings of {max}; prepare it with a smaller seq_len",
                data.seq_len()
            ),
        ));
    }
    let v = data.manifest.tokenizer.vocab_size;
    if v > files.config.vocab_size {
        return Err(Error::format(
            path,
            format!(
                "was tokenized with a vocabulary of {v} tokens, larger than the model's {}; prepare the data with the model's tokenizer",
                files.config.vocab_size
            ),
        ));
    }
    Ok(data)
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
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

/// The pruning plan with every default filled in (what `resolved.toml` holds).
pub fn resolve_prune(
    c: &PruneConfig,
    source: &shears_core::LlamaConfig,
) -> Result<(PruneConfig, PruningSpec)> {
    c.check_ranges().map_err(Error::invalid)?;
    let mut c = c.clone();
    c.run.resolve(StageKind::Prune);
    c.optim
        .warmup_steps
        .get_or_insert(StageKind::Prune.warmup_steps(c.run.steps));
    c.pruning
        .lagrangian_warmup_steps
        .get_or_insert(StageKind::Prune.lagrangian_warmup_steps(c.run.steps));
    let spec = PruningSpec::new(source, c.target, c.pruning.modules.as_deref())?;
    c.pruning.modules = Some(spec.modules.clone());
    Ok((c, spec))
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
    let rates = PruneRates {
        model: resolved.optim.adamw(),
        mask_lr: resolved.pruning.mask_lr,
        multiplier_lr: resolved.pruning.multiplier_lr,
        lagrangian_warmup_steps: resolved.pruning.lagrangian_warmup_steps.unwrap_or(0),
    };
    let parts = Parts {
        run: &resolved.run,
        optim: &resolved.optim,
        dbl: &resolved.dbl,
    };
    let seed = resolved.run.seed;
    let compute = resolved.run.compute(false);
    // Every rank starts from the same weights and the same mask initialisation (`seed`).
    run_stage(
        job,
        &toml::to_string(&resolved).expect("toml"),
        parts,
        &data,
        device,
        files,
        |files, device| {
            PruneStage::<B>::new(files, &spec, rates, seed, device).map(|s| s.with_compute(compute))
        },
    )
}

/// The training plan with every default filled in.
pub fn resolve_train(c: &TrainConfig) -> Result<TrainConfig> {
    c.check_ranges().map_err(Error::invalid)?;
    let mut c = c.clone();
    c.run.resolve(StageKind::Train);
    c.optim
        .warmup_steps
        .get_or_insert(StageKind::Train.warmup_steps(c.run.steps));
    Ok(c)
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
        run: &resolved.run,
        optim: &resolved.optim,
        dbl: &resolved.dbl,
    };
    let adamw = resolved.optim.adamw();
    let compute = resolved.run.compute(false);
    let teacher = match resolved.distill.spec() {
        Some(spec) => {
            let name = teacher_model(&resolved)?.expect("a teacher when distilling");
            let t = load_model(&name)?;
            check_teacher(&files, &t)?;
            let len = resolved.run.seq_len.unwrap_or(data.seq_len());
            let max = t.config.max_position_embeddings;
            if len > max {
                return Err(Error::invalid(format!(
                    "the teacher {} attends over at most {max} positions (max_position_embeddings), fewer than the training sequences' {len} tokens; lower run.seq_len or choose another teacher",
                    t.source.display()
                )));
            }
            Some((spec, resolved.distill.alpha, t))
        }
        None => None,
    };
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

/// Host data every data-parallel rank builds its device copy from: kept until `ranks` ranks
/// have used it, then freed.
struct UntilEveryRank<T> {
    value: Mutex<(Option<T>, usize)>,
    ranks: usize,
}

impl<T> UntilEveryRank<T> {
    fn new(value: T, ranks: usize) -> Self {
        UntilEveryRank {
            value: Mutex::new((Some(value), 0)),
            ranks,
        }
    }

    /// `f` of the value (one rank at a time); the last rank's call frees it.
    fn use_once<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let mut g = self.value.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(g.0.as_ref().expect("host data until every rank is built"));
        g.1 += 1;
        if g.1 == self.ranks {
            g.0 = None;
        }
        r
    }
}

/// The teacher model `distill.teacher` names, `None` without one. `"source"` is the model the
/// student was pruned from, as `shears finalize` recorded it in the student's
/// `masks.safetensors` (the pipeline passes its `model` instead).
pub fn teacher_model(c: &TrainConfig) -> Result<Option<String>> {
    let Some(t) = &c.distill.teacher else {
        return Ok(None);
    };
    if t != SOURCE_TEACHER {
        return Ok(Some(t.clone()));
    }
    let masks = Path::new(&c.model).join("masks.safetensors");
    let recorded = if masks.is_file() {
        let f = shears_core::formats::safetensors::SafeTensorsFile::open(&masks)?;
        f.metadata().get(SOURCE_MODEL_KEY).cloned()
    } else {
        None
    };
    recorded.map(Some).ok_or_else(|| {
        Error::invalid(format!(
            "distill.teacher = \"source\": {} does not record the model it was pruned from (models written by `shears finalize` do, in masks.safetensors); name the teacher model instead",
            c.model
        ))
    })
}

/// The source model of a pruning run directory, as its resolved plan names it: an absolute
/// path where it names an existing file or directory (so a teacher found through it does not
/// depend on the working directory), else the name (`smollm2`). `None` when the plan cannot be
/// read.
fn run_source_model(run: &Path) -> Option<String> {
    let text = std::fs::read_to_string(run.join(crate::run_dir::RESOLVED)).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    let model = v.get("model")?.as_str()?.to_string();
    Some(match std::fs::canonicalize(&model) {
        Ok(p) => p.display().to_string(),
        Err(_) => model,
    })
}

/// The metadata key of `masks.safetensors` that records the source model of a finalized model.
pub const SOURCE_MODEL_KEY: &str = "source_model";

/// A teacher must share the student's vocabulary: the same size and, where both carry a
/// tokenizer, the same `tokenizer.json`.
pub fn check_teacher(student: &ModelFiles, teacher: &ModelFiles) -> Result<()> {
    let (s, t) = (student.config.vocab_size, teacher.config.vocab_size);
    if s != t {
        return Err(Error::invalid(format!(
            "the teacher {} has a vocabulary of {t} tokens and the student {} one of {s}: distillation needs the same tokenizer",
            teacher.source.display(),
            student.source.display()
        )));
    }
    let missing: Vec<String> = [student, teacher]
        .iter()
        .filter(|m| m.tokenizer.is_none())
        .map(|m| m.source.display().to_string())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "warning: {} has no tokenizer.json, so the teacher's and the student's tokenizers \
             cannot be compared (only their vocabulary sizes, {s}, agree); distillation is \
             meaningless if they tokenize differently",
            missing.join(" and ")
        );
    }
    if let (Some(a), Some(b)) = (&student.tokenizer, &teacher.tokenizer) {
        let (a, b) = (
            shears_data::prepare::tokenizer_sha256(a),
            shears_data::prepare::tokenizer_sha256(b),
        );
        if a != b {
            return Err(Error::invalid(format!(
                "the teacher {} has another tokenizer than the student {} (tokenizer.json sha256 {} vs {}): distillation needs the same one",
                teacher.source.display(),
                student.source.display(),
                short(&b),
                short(&a)
            )));
        }
    }
    Ok(())
}

/// The settings both stage plans share.
struct Parts<'a> {
    run: &'a RunSettings,
    optim: &'a OptimSettings,
    dbl: &'a DblSettings,
}

/// The device of data-parallel rank `rank`: `device`'s kind with index `rank` (`cuda:rank`);
/// on the CPU backends every rank gets the one CPU device.
fn rank_device<B: ShearsAutodiff>(device: &B::Device, rank: usize) -> B::Device {
    use burn::tensor::backend::Device;
    if rank == 0 {
        return device.clone();
    }
    let mut id = device.to_id();
    id.index_id = id.index_id.saturating_add(rank as u16);
    <B::Device as Device>::from_id(id)
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
    let inputs = LoopInputs {
        run: p.run,
        optim: p.optim,
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
