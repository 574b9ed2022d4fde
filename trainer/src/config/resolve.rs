//! Plan resolution, the one place defaults are filled in: a plan's stage-dependent defaults
//! ([`resolve_prune`], [`resolve_train`]: what `resolved.toml` holds) and, against the data, the
//! [`LoopSettings`] the training loop reads. Nothing downstream falls back to a default.

use shears_core::{Error, LlamaConfig, Result};
use shears_data::Dataset;
use shears_eval::domain::EvalSettings;
use shears_pruning::PruningSpec;

use super::{CheckRanges, OptimSettings, PruneConfig, RunSettings, StageKind, TrainConfig};

/// The run and optimizer settings with `stage`'s defaults filled in (idempotent).
fn resolve_run(stage: StageKind, run: &mut RunSettings, optim: &mut OptimSettings) {
    run.resolve(stage);
    optim
        .warmup_steps
        .get_or_insert(stage.warmup_steps(run.steps));
}

/// The pruning plan with every default filled in (what `resolved.toml` holds), and its
/// pruning problem on the `source` model.
pub fn resolve_prune(c: &PruneConfig, source: &LlamaConfig) -> Result<(PruneConfig, PruningSpec)> {
    c.check_ranges().map_err(Error::invalid)?;
    let mut c = c.clone();
    resolve_run(StageKind::Prune, &mut c.run, &mut c.optim);
    c.pruning
        .lagrangian_warmup_steps
        .get_or_insert(StageKind::Prune.lagrangian_warmup_steps(c.run.steps));
    let spec = PruningSpec::new(source, c.target, c.pruning.modules.as_deref())?;
    c.pruning.modules = Some(spec.modules.clone());
    Ok((c, spec))
}

/// The training plan with every default filled in.
pub fn resolve_train(c: &TrainConfig) -> Result<TrainConfig> {
    c.check_ranges().map_err(Error::invalid)?;
    let mut c = c.clone();
    resolve_run(StageKind::Train, &mut c.run, &mut c.optim);
    Ok(c)
}

/// The training sequence length of `run` on `data` (default: the data's).
pub fn seq_len(run: &RunSettings, data: &Dataset) -> Result<usize> {
    let n = run.seq_len.unwrap_or(data.seq_len());
    if n > data.seq_len() {
        return Err(Error::invalid(format!(
            "run.seq_len {n} is longer than the data's sequences ({})",
            data.seq_len()
        )));
    }
    Ok(n)
}

/// Eval settings of `run` on `data` (default length: the training `seq_len`).
pub fn eval_settings(run: &RunSettings, data: &Dataset) -> Result<EvalSettings> {
    let train = seq_len(run, data)?;
    let n = run.eval_seq_len.unwrap_or(train);
    if n > data.seq_len() {
        return Err(Error::invalid(format!(
            "run.eval_seq_len {n} is longer than the data's sequences ({})",
            data.seq_len()
        )));
    }
    Ok(EvalSettings {
        sequences: run.eval_sequences,
        seq_len: n,
        batch: run.eval_batch.max(1),
    })
}

/// Everything the training loop reads, resolved once from a plan and the data.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopSettings {
    pub steps: usize,
    /// Sequences per optimizer step (the global batch).
    pub batch_size: usize,
    /// Sequences per forward.
    pub micro_batch: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Seed of the data order and the mask samples.
    pub seed: u64,
    pub eval: EvalSettings,
    /// Steps between evaluations (and domain-weight updates).
    pub eval_interval: usize,
    /// Evaluate before the first step.
    pub eval_first: bool,
    /// Steps between checkpoints (and one at the end).
    pub checkpoint_interval: usize,
    pub keep_checkpoints: usize,
    /// Consecutive non-finite steps that stop the run.
    pub max_bad_steps: usize,
    /// Learning-rate warm-up of the cosine schedule.
    pub warmup_steps: usize,
    /// The schedule's final learning-rate multiplier.
    pub final_lr_ratio: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
}

impl LoopSettings {
    /// The settings of a `stage` run of `run` and `optim` on `data`.
    pub fn new(
        stage: StageKind,
        run: &RunSettings,
        optim: &OptimSettings,
        data: &Dataset,
    ) -> Result<Self> {
        let (mut run, mut optim) = (run.clone(), optim.clone());
        resolve_run(stage, &mut run, &mut optim);
        let resolved = |what: &str| Error::invalid(format!("{what} is not resolved"));
        Ok(LoopSettings {
            steps: run.steps,
            batch_size: run.batch_size,
            micro_batch: run.micro(),
            seq_len: seq_len(&run, data)?,
            seed: run.seed,
            eval: eval_settings(&run, data)?,
            eval_interval: run
                .eval_interval
                .ok_or_else(|| resolved("run.eval_interval"))?,
            eval_first: run.eval_first.ok_or_else(|| resolved("run.eval_first"))?,
            checkpoint_interval: run
                .checkpoint_interval
                .ok_or_else(|| resolved("run.checkpoint_interval"))?,
            keep_checkpoints: run.keep_checkpoints,
            max_bad_steps: run.max_bad_steps,
            warmup_steps: optim
                .warmup_steps
                .ok_or_else(|| resolved("optim.warmup_steps"))?,
            final_lr_ratio: optim.final_lr_ratio,
            grad_clip: optim.grad_clip,
        })
    }
}
