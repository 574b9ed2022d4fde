//! Run plans: the TOML files `shears prune` and `shears train` read. Every field is documented
//! and has a default that follows the paper's recipe (method §7) where the recipe has one; steps,
//! batch and lengths are settings because a laptop run and an 8-GPU run differ there.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shears_core::{Error, Result};
use shears_data::{Exhaustion, ReferenceSource, RuleConfig};
use shears_models::distill::{Divergence, KdSpec};
use shears_pruning::{PruneModule, TargetShape};

use crate::compute::{Checkpointing, Compute, Precision, StatePrecision};
use crate::optim::AdamWSettings;

mod checks;
mod resolve;
pub use checks::{limits, read_toml, CheckRanges};
pub use resolve::{eval_settings, resolve_prune, resolve_train, seq_len, LoopSettings};

/// The loop: length, batches, evaluation, checkpoints and guards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSettings {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per optimizer step (the global batch).
    pub batch_size: usize,
    /// Sequences per forward pass; `batch_size / micro_batch` forwards are accumulated per step.
    /// Default: the whole batch in one forward.
    pub micro_batch: Option<usize>,
    /// Tokens per training sequence: the prepared sequences are cut to their first `seq_len`
    /// tokens. Default: the data's sequence length.
    pub seq_len: Option<usize>,
    /// Seed of the data order and the mask samples.
    pub seed: u64,
    /// Evaluate (and update the domain weights) every this many steps (default: 50 when
    /// pruning, 400 in continued pre-training).
    pub eval_interval: Option<usize>,
    /// Also evaluate before the first step (default: no when pruning, yes in continued
    /// pre-training, as the reference).
    pub eval_first: Option<bool>,
    /// Eval sequences per domain (default: all of them).
    pub eval_sequences: Option<usize>,
    /// Eval tokens per sequence (default: the training `seq_len`).
    pub eval_seq_len: Option<usize>,
    /// Sequences per eval forward.
    pub eval_batch: usize,
    /// Write a checkpoint every this many steps (and always at the end); default: every eval.
    pub checkpoint_interval: Option<usize>,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    /// Consecutive non-finite steps that stop the run.
    pub max_bad_steps: usize,
    /// Tensor backend: ndarray, flex, wgpu or cuda (default: the CLI's).
    pub backend: Option<String>,
    /// Numeric precision: "f32", or "bf16-mixed" (f32 master weights and AdamW, bf16 forward
    /// and backward, reductions in f32). Default: bf16-mixed on cuda, f32 elsewhere.
    pub precision: Option<Precision>,
    /// Precision of AdamW's moments for the model weights: "f32", or "bf16" (half the
    /// optimizer memory; the update is computed in f32).
    pub optimizer_state: StatePrecision,
    /// Activation checkpointing: "none", or "layers" (keep only each layer's input, recompute
    /// the layer in its backward: about one extra forward per step for much less memory).
    pub checkpointing: Checkpointing,
    /// Data-parallel ranks, one device and one thread each (`cuda:0..N-1`; on the CPU
    /// backends N replicas sharing the cores). The global batch stays `batch_size`: its
    /// micro-batches are dealt out to the ranks, so N ranks compute what one rank
    /// accumulating them would.
    pub devices: usize,
    /// Seconds one rank may wait in one collective (all-reduce) before the run is stopped
    /// as hung.
    pub collective_timeout_s: f64,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            steps: 3200,
            batch_size: 32,
            micro_batch: None,
            seq_len: None,
            seed: 17,
            eval_interval: None,
            eval_first: None,
            eval_sequences: None,
            eval_seq_len: None,
            eval_batch: 8,
            checkpoint_interval: None,
            keep_checkpoints: 2,
            max_bad_steps: 5,
            backend: None,
            precision: None,
            optimizer_state: StatePrecision::F32,
            checkpointing: Checkpointing::None,
            devices: 1,
            collective_timeout_s: 1800.0,
        }
    }
}

/// Optimizer and schedule of the model weights (method §4.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSettings {
    /// Peak learning rate of the model weights.
    pub lr: f64,
    /// Stored as f64 so the written plan shows what was typed (0.9, not 0.8999999761581421);
    /// the optimizer runs in f32.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Warm-up steps of the cosine schedule (default: 10% of the steps).
    pub warmup_steps: Option<usize>,
    /// Final learning-rate multiplier of the cosine schedule (`α_f`).
    pub final_lr_ratio: f64,
    /// Global L2 norm the gradients are clipped to (over all parameter groups); 0 disables.
    pub grad_clip: f64,
}

impl Default for OptimSettings {
    fn default() -> Self {
        OptimSettings {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: None,
            final_lr_ratio: 0.1,
            grad_clip: 1.0,
        }
    }
}

impl OptimSettings {
    /// AdamW with these settings.
    pub fn adamw(&self) -> AdamWSettings {
        AdamWSettings {
            lr: self.lr,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
        }
    }
}

/// Dynamic batch loading (method §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DblSettings {
    /// Reweighting rule: `{ rule = "code", eta = 1.0, smoothing = 1e-4 }` (default), `paper`
    /// or `constant`.
    pub rule: RuleConfig,
    /// Reference losses: `{ source = "source_model" }` (default: the starting model's own eval
    /// loss per domain), `{ source = "given", losses = {..} }`, or a scaling-law fit.
    pub reference: ReferenceSource,
    /// Starting domain weights by name (default: proportional to each domain's train tokens).
    pub initial_weights: Option<BTreeMap<String, f64>>,
    /// Start from the final domain weights of a finished run directory (continued pre-training
    /// after pruning); overrides `initial_weights`.
    pub initial_weights_from: Option<PathBuf>,
    /// When a domain runs out: `error` (the reference's behaviour) or `wrap` into a new epoch.
    pub exhaustion: Exhaustion,
}

impl Default for DblSettings {
    fn default() -> Self {
        DblSettings {
            rule: RuleConfig::default(),
            reference: ReferenceSource::SourceModel,
            initial_weights: None,
            initial_weights_from: None,
            exhaustion: Exhaustion::Error,
        }
    }
}

/// Knowledge distillation in continued pre-training (beyond LLM-Shearing; NVIDIA Minitron):
/// the pruned student learns the teacher's next-token distribution. The teacher runs forward
/// only, in the run's precision, with no autodiff graph and no optimizer state; the loss is
/// `(1 − alpha) · LM + alpha · T² · divergence`, both means over the positions the LM loss
/// scores. Dynamic batch loading keeps using the LM loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillSettings {
    /// The teacher: `"source"` (the model the student was pruned from: the pipeline's
    /// `model`, or what a finalized model's `masks.safetensors` records), or a model (HF
    /// directory, `.gguf`, known name). Unset: no distillation.
    pub teacher: Option<String>,
    /// Weight of the KD term; the LM loss gets `1 − alpha`. Default 1.0: pure distillation,
    /// Minitron's finding for recovering a pruned model. 0 trains exactly as without a teacher.
    pub alpha: f64,
    /// Softmax temperature of both distributions (the divergence is scaled by `T²`).
    pub temperature: f64,
    /// `"kl"` (KL(teacher ‖ student), the default) or `"reverse_kl"` (KL(student ‖ teacher)).
    pub loss: Divergence,
    /// The divergence over the teacher's `top_k` largest logits only, both distributions
    /// renormalised over them; 0 = the whole vocabulary.
    pub top_k: usize,
}

impl Default for DistillSettings {
    fn default() -> Self {
        DistillSettings {
            teacher: None,
            alpha: 1.0,
            temperature: 1.0,
            loss: Divergence::Kl,
            top_k: 0,
        }
    }
}

/// `distill.teacher` naming the model the student was pruned from.
pub const SOURCE_TEACHER: &str = "source";

impl DistillSettings {
    /// No teacher: the plan trains on the LM loss alone (and prints no `[distill]` section).
    pub fn is_off(&self) -> bool {
        self.teacher.is_none()
    }

    /// The KD computation, when a teacher is set and `alpha > 0`.
    pub fn spec(&self) -> Option<KdSpec> {
        (self.teacher.is_some() && self.alpha > 0.0).then_some(KdSpec {
            divergence: self.loss,
            temperature: self.temperature,
            top_k: self.top_k,
        })
    }
}

/// The L0 stage's own settings (method §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PruningSettings {
    /// Learning rate of the masks' `log_alpha` (`lag_lr`).
    pub mask_lr: f64,
    /// Learning rate of the Lagrange multipliers, applied as gradient ascent.
    pub multiplier_lr: f64,
    /// Steps over which the target sparsity ramps up from 0 (default: 20% of the steps).
    pub lagrangian_warmup_steps: Option<usize>,
    /// Pruned modules (default: every module whose target differs from the source).
    pub modules: Option<Vec<PruneModule>>,
    /// Where the masks start (method §12): "uniform" (every `log_alpha` at the clamp's top, the
    /// reference's init) or "importance" (the step-0 deterministic mask is the activation
    /// importance top-k of the target shape, measured on `calib` sequences of the data).
    pub init: MaskInit,
    /// Calibration sequences for the importance scores, drawn evenly from every domain's
    /// training split (deterministic).
    pub calib: usize,
    /// Scores measured earlier (an `importance.safetensors` of a run on the same source), read
    /// instead of measuring again.
    pub importance_file: Option<PathBuf>,
    /// "l0" (learned masks, the Lagrangian stage) or "importance": one-shot pruning to the
    /// target by activation importance (method §12), no training steps; `shears prune` then
    /// writes the dense model to `--out`, ready for `shears train`.
    pub method: PruneMethod,
}

/// How `shears prune` prunes (`[pruning] method`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneMethod {
    /// Learned hard-concrete masks with Lagrangian constraints (method §1-§4).
    #[default]
    L0,
    /// One shot, by activation importance (method §12).
    Importance,
}

/// How the masks start (`[pruning] init`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskInit {
    /// Every `log_alpha` from `N(5, 0.01)`, clamped to `ln 100` (the reference).
    #[default]
    Uniform,
    /// Ranked by activation importance (method §12).
    Importance,
}

impl Default for PruningSettings {
    fn default() -> Self {
        PruningSettings {
            mask_lr: 1.0,
            multiplier_lr: 1.0,
            lagrangian_warmup_steps: None,
            modules: None,
            init: MaskInit::Uniform,
            calib: 256,
            importance_file: None,
            method: PruneMethod::L0,
        }
    }
}

/// Deliberate failures, for tests of the guards: not part of any plan. Builds with the
/// `fault-injection` feature (the test builds) read them from the `SHEARS_FAULTS` environment
/// variable, a TOML table such as `nan_loss_at_steps = [3]`; other builds never inject any.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Steps (1-based) whose loss and gradients are made NaN.
    pub nan_loss_at_steps: Vec<usize>,
    /// Steps whose checkpoint write fails as if the disk were full.
    pub checkpoint_error_at_steps: Vec<usize>,
    /// Sleep this long after every step (to make a run slow enough to kill mid-way).
    pub step_delay_ms: u64,
    /// A data-parallel rank that fails with an error at the start of a step:
    /// `rank_error = { rank = 1, step = 3 }`.
    pub rank_error: Option<RankFault>,
    /// A data-parallel rank that stalls at the start of a step until the run is stopped (for
    /// the collective timeout).
    pub rank_stall: Option<RankFault>,
}

/// A rank and a step (1-based) of an injected data-parallel failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankFault {
    pub rank: usize,
    pub step: usize,
}

/// The environment variable fault-injection builds read [`Faults`] from.
pub const FAULTS_ENV: &str = "SHEARS_FAULTS";

impl Faults {
    /// The injected rank faults of step `step` (1-based) on `rank`: an error, or a stall until
    /// the run is stopped.
    pub fn at_rank(&self, rank: usize, step: usize, comm: &crate::parallel::Comm) -> Result<()> {
        let hit = |f: &Option<RankFault>| f.is_some_and(|f| f.rank == rank && f.step == step);
        if hit(&self.rank_error) {
            return Err(Error::invalid(format!(
                "injected failure at step {step} on rank {rank}"
            )));
        }
        if hit(&self.rank_stall) && comm.world() > 1 {
            while !comm.aborted() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The faults this process injects: `SHEARS_FAULTS` in a `fault-injection` build, none
    /// otherwise.
    pub fn from_env() -> Result<Faults> {
        if !cfg!(feature = "fault-injection") {
            return Ok(Faults::default());
        }
        match std::env::var(FAULTS_ENV) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| Error::invalid(format!("{FAULTS_ENV}: not a fault table: {e}"))),
            Err(_) => Ok(Faults::default()),
        }
    }
}

/// `shears prune --config prune.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneConfig {
    /// Source model: an HF directory, a `.gguf` file or a known name (smollm2).
    pub model: String,
    /// Prepared data directory (`shears prepare`).
    pub data: PathBuf,
    /// Target shape.
    pub target: TargetShape,
    #[serde(default)]
    pub run: RunSettings,
    #[serde(default)]
    pub optim: OptimSettings,
    #[serde(default)]
    pub pruning: PruningSettings,
    #[serde(default)]
    pub dbl: DblSettings,
    /// Distillation while pruning (method §12): `teacher = "source"` is the model being pruned,
    /// frozen as it was before the stage (one extra forward-only copy).
    #[serde(default)]
    pub distill: DistillSettings,
}

/// `shears train --config train.toml`: continued pre-training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model to train: an HF directory (e.g. a finalized pruned model), `.gguf` or known name.
    pub model: String,
    /// Prepared data directory.
    pub data: PathBuf,
    /// Replace the model's weights with a seeded random initialisation of the same shape
    /// (normal, std 0.02): the from-scratch baseline a pruned model is compared with.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_scratch: bool,
    #[serde(default)]
    pub run: RunSettings,
    #[serde(default)]
    pub optim: OptimSettings,
    #[serde(default)]
    pub dbl: DblSettings,
    #[serde(default, skip_serializing_if = "DistillSettings::is_off")]
    pub distill: DistillSettings,
}

/// Which loop a plan is for; the defaults that differ between them follow from it, and are
/// written down only here (method §5.3, §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Prune,
    Train,
}

impl StageKind {
    /// The name in checkpoints, logs and progress bars.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Prune => "prune",
            StageKind::Train => "train",
        }
    }

    /// Steps between evaluations (and DBL updates): 50 when pruning, 400 in continued
    /// pre-training.
    pub fn eval_interval(self) -> usize {
        match self {
            StageKind::Prune => 50,
            StageKind::Train => 400,
        }
    }

    /// Whether to evaluate before the first step: no when pruning, yes in continued
    /// pre-training.
    pub fn eval_first(self) -> bool {
        self == StageKind::Train
    }

    /// Learning-rate warm-up, in percent of the steps, when the plan gives none: 10% when
    /// pruning, 3% in continued pre-training.
    pub fn warmup_percent(self) -> usize {
        match self {
            StageKind::Prune => 10,
            StageKind::Train => 3,
        }
    }

    /// Learning-rate warm-up steps when the plan gives none ([`StageKind::warmup_percent`]).
    pub fn warmup_steps(self, steps: usize) -> usize {
        percent_of(steps, self.warmup_percent())
    }

    /// The target-sparsity ramp, in percent of the steps, when the plan gives none.
    pub const LAGRANGIAN_WARMUP_PERCENT: usize = 20;

    /// The target-sparsity ramp steps when the plan gives none.
    pub fn lagrangian_warmup_steps(self, steps: usize) -> usize {
        percent_of(steps, Self::LAGRANGIAN_WARMUP_PERCENT)
    }

    /// The plan sections this stage reads, besides `model`, `data` (and `target`).
    fn sections(self) -> &'static [&'static str] {
        match self {
            StageKind::Prune => &["run", "optim", "pruning", "dbl", "distill"],
            StageKind::Train => &["run", "optim", "dbl", "distill"],
        }
    }

    /// What fills each setting that has no fixed default, by `section.key`.
    fn derived_defaults(self) -> Vec<(&'static str, String)> {
        let mut d = vec![
            (
                "run.micro_batch",
                "run.batch_size (one forward per step)".into(),
            ),
            ("run.seq_len", "the prepared data's sequence length".into()),
            ("run.eval_sequences", "every eval sequence".into()),
            ("run.eval_seq_len", "run.seq_len".into()),
            ("run.checkpoint_interval", "run.eval_interval".into()),
            ("run.backend", "the CLI's --backend".into()),
            (
                "run.precision",
                "\"bf16-mixed\" on cuda, \"f32\" elsewhere".into(),
            ),
            (
                "optim.warmup_steps",
                format!("{}% of run.steps", self.warmup_percent()),
            ),
            (
                "dbl.initial_weights",
                "each domain's share of the train tokens".into(),
            ),
            ("dbl.initial_weights_from", "unset".into()),
        ];
        d.push((
            "distill.teacher",
            "unset (no distillation); \"source\" or a model".into(),
        ));
        if self == StageKind::Prune {
            d.push((
                "pruning.lagrangian_warmup_steps",
                format!("{}% of run.steps", Self::LAGRANGIAN_WARMUP_PERCENT),
            ));
            d.push((
                "pruning.modules",
                "every module whose target differs from the source".into(),
            ));
            d.push((
                "pruning.importance_file",
                "unset (measured on pruning.calib sequences when importance is used)".into(),
            ));
        }
        d
    }
}

/// `p`% of `n`, rounded down, without overflowing for any `n`.
fn percent_of(n: usize, p: usize) -> usize {
    n / 100 * p + n % 100 * p / 100
}

/// Every setting of a stage's plan with its default, as TOML: what `shears defaults` prints and
/// the README shows, generated from the `Default` impls and [`StageKind`] (the one place the
/// defaults are written). Settings whose default follows from other settings or from the data
/// appear as comments that say so. The run length is the default's (`run.steps`), so the
/// stage-dependent intervals are the ones a plan without them gets.
pub fn defaults_toml(stage: StageKind) -> String {
    let mut run = RunSettings::default();
    run.resolve(stage);
    run.checkpoint_interval = None; // follows run.eval_interval; shown as a comment
    let sections: Vec<(&str, toml::Value)> = vec![
        ("run", toml::Value::try_from(&run).expect("plain settings")),
        (
            "optim",
            toml::Value::try_from(OptimSettings::default()).expect("plain settings"),
        ),
        (
            "pruning",
            toml::Value::try_from(PruningSettings::default()).expect("plain settings"),
        ),
        (
            "dbl",
            toml::Value::try_from(DblSettings::default()).expect("plain settings"),
        ),
        (
            "distill",
            toml::Value::try_from(DistillSettings::default()).expect("plain settings"),
        ),
    ];
    let derived = stage.derived_defaults();
    let mut out = String::new();
    for (name, value) in sections {
        if !stage.sections().contains(&name) {
            continue;
        }
        out.push_str(&format!("[{name}]\n"));
        let table = value.as_table().expect("a settings struct is a table");
        for (key, v) in table {
            out.push_str(&format!("{key} = {v}\n"));
        }
        for (key, what) in &derived {
            if let Some(k) = key.strip_prefix(name).and_then(|k| k.strip_prefix('.')) {
                out.push_str(&format!("# {k}: default {what}\n"));
            }
        }
    }
    out
}

impl RunSettings {
    /// Fill the stage-dependent defaults ([`StageKind`]'s, method §5.3, §7).
    pub fn resolve(&mut self, stage: StageKind) {
        let interval = *self
            .eval_interval
            .get_or_insert(stage.eval_interval().min(self.steps.max(1)));
        self.eval_first.get_or_insert(stage.eval_first());
        self.checkpoint_interval.get_or_insert(interval);
    }

    /// The compute settings on a backend (`cuda`: whether it is the CUDA one, where
    /// precision defaults to bf16-mixed).
    pub fn compute(&self, cuda: bool) -> Compute {
        Compute {
            precision: self.precision.unwrap_or(if cuda {
                Precision::Bf16Mixed
            } else {
                Precision::F32
            }),
            optimizer_state: self.optimizer_state,
            checkpointing: self.checkpointing,
        }
    }

    /// Sequences per forward.
    pub fn micro(&self) -> usize {
        self.micro_batch.unwrap_or(self.batch_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_prune_plan_gets_recipe_defaults() {
        let c: PruneConfig = toml::from_str(
            r#"
model = "smollm2"
data = "data"
[target]
num_hidden_layers = 20
hidden_size = 384
num_attention_heads = 6
num_key_value_heads = 3
intermediate_size = 1024
"#,
        )
        .unwrap();
        assert_eq!(c.optim.lr, 1e-4);
        assert_eq!(c.optim.beta2, 0.95);
        let mut run = c.run.clone();
        run.resolve(StageKind::Prune);
        assert_eq!(run.eval_interval, Some(50));
        assert_eq!(run.eval_first, Some(false));
        assert_eq!(c.pruning.mask_lr, 1.0);
        assert_eq!(c.dbl.reference, ReferenceSource::SourceModel);
        // It prints back and reads again to the same plan.
        let back: PruneConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_and_bad_batches_are_errors() {
        let e = toml::from_str::<PruneConfig>(
            "model='m'\ndata='d'\nstepz=3\n[target]\nnum_hidden_layers=1\nhidden_size=1\nnum_attention_heads=1\nnum_key_value_heads=1\nintermediate_size=1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("stepz"), "{e}");
        let r = RunSettings {
            batch_size: 6,
            micro_batch: Some(4),
            ..RunSettings::default()
        };
        assert!(r.validate().unwrap_err().to_string().contains("divide"));
        let t: TrainConfig = toml::from_str("model='m'\ndata='d'\n[run]\nsteps=1000\n").unwrap();
        let mut run = t.run.clone();
        run.resolve(StageKind::Train);
        assert_eq!(run.eval_interval, Some(400));
        assert_eq!(run.eval_first, Some(true));
    }

    #[test]
    fn printed_defaults_read_back_as_the_defaults() {
        let head = "model = 'm'\ndata = 'd'\n";
        let target = "[target]\nnum_hidden_layers = 1\nhidden_size = 1\nnum_attention_heads = 1\nnum_key_value_heads = 1\nintermediate_size = 1\n";
        let text = defaults_toml(StageKind::Prune);
        let c: PruneConfig = toml::from_str(&format!("{head}{target}{text}")).unwrap();
        let mut run = RunSettings::default();
        run.resolve(StageKind::Prune);
        run.checkpoint_interval = None;
        assert_eq!(c.run, run);
        assert_eq!(c.optim, OptimSettings::default());
        assert_eq!(c.pruning, PruningSettings::default());
        assert_eq!(c.dbl, DblSettings::default());
        assert!(
            text.contains("# warmup_steps: default 10% of run.steps"),
            "{text}"
        );
        assert!(text.contains("beta1 = 0.9\n"), "{text}");
        let text = defaults_toml(StageKind::Train);
        assert!(!text.contains("[pruning]"));
        assert!(text.contains("eval_interval = 400\n"), "{text}");
        assert!(
            text.contains("# warmup_steps: default 3% of run.steps"),
            "{text}"
        );
        let t: TrainConfig = toml::from_str(&format!("{head}{text}")).unwrap();
        assert_eq!(t.run.eval_first, Some(true));
    }

    #[test]
    fn percentages_round_down_without_overflow() {
        for n in [0, 1, 9, 10, 99, 100, 101, 3199, 3200, 12345, usize::MAX] {
            assert_eq!(StageKind::Prune.warmup_steps(n), n / 10);
            assert_eq!(StageKind::Prune.lagrangian_warmup_steps(n), n / 5);
            assert_eq!(
                StageKind::Train.warmup_steps(n) as u128,
                n as u128 * 3 / 100
            );
        }
    }
}
