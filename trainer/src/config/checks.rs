//! Reading a plan and checking the range of every number in it, before a model or data is
//! loaded; messages name the setting (`optim.lr`, `run.batch_size`, ...).

use std::path::Path;

use serde::Deserialize;
use shears_core::{Error, Result};
use shears_data::{ReferenceSource, RuleConfig};

use super::{
    DblSettings, DistillSettings, OptimSettings, PruneConfig, PruningSettings, RunSettings,
    TrainConfig,
};

/// Read a TOML plan and check every number's range; errors name the file and the setting.
pub fn read_toml<T: for<'de> Deserialize<'de> + CheckRanges>(path: &Path) -> Result<T> {
    let text = shears_core::fsutil::read_text(path, shears_core::fsutil::SETTINGS_FILE_BYTES)?;
    let plan: T =
        toml::from_str(&text).map_err(|e| Error::format(path, format!("invalid plan: {e}")))?;
    plan.check_ranges()
        .map_err(|m| Error::format(path, format!("invalid plan: {m}")))?;
    Ok(plan)
}

/// The range of every number of a plan, checked when it is read, before a model or data is
/// loaded. The message names the setting (`optim.lr`, `run.batch_size`, ...).
pub trait CheckRanges {
    fn check_ranges(&self) -> std::result::Result<(), String>;
}

/// Upper bounds on the loop's sizes, far above any real run; they keep every product of them
/// (tokens per step, positions) inside 64 bits.
pub mod limits {
    /// Sequences per step, per forward, per eval forward.
    pub const BATCH: usize = shears_pruning::memory::limits::BATCH;
    /// Data-parallel devices.
    pub const DEVICES: usize = shears_pruning::memory::limits::DEVICES;
    /// Optimizer steps (and warm-up, interval and checkpoint counts).
    pub const STEPS: usize = 1 << 40;
    /// Tokens per sequence (the model's `max_position_embeddings` is the real bound; this one
    /// holds before the model is read).
    pub const SEQ_LEN: usize = shears_core::config::limits::POSITIONS;
    /// Vocabulary entries (`distill.top_k`).
    pub const VOCAB: usize = shears_core::config::limits::VOCAB;
}

/// `value` is a finite number in the range `ok` describes.
fn in_range(
    name: &str,
    value: f64,
    ok: impl Fn(f64) -> bool,
    range: &str,
) -> std::result::Result<(), String> {
    if value.is_finite() && ok(value) {
        Ok(())
    } else {
        Err(format!("{name} = {value} must be {range}"))
    }
}

/// A count the plan may leave out, at most `max`.
fn at_most(name: &str, value: Option<usize>, max: usize) -> std::result::Result<(), String> {
    match value {
        Some(n) if n > max => Err(format!("{name} = {n} is beyond the limit of {max}")),
        _ => Ok(()),
    }
}

fn non_negative(name: &str, value: f64) -> std::result::Result<(), String> {
    in_range(name, value, |v| v >= 0.0, "a finite number >= 0")
}

impl OptimSettings {
    /// Learning rate, betas, epsilon, decay, schedule and clipping ranges.
    pub fn check_ranges(&self, prefix: &str) -> std::result::Result<(), String> {
        non_negative(&format!("{prefix}.lr"), self.lr)?;
        for (k, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            in_range(
                &format!("{prefix}.{k}"),
                b,
                |v| (0.0..1.0).contains(&v),
                "in [0, 1)",
            )?;
        }
        in_range(
            &format!("{prefix}.eps"),
            self.eps,
            |v| v > 0.0,
            "a finite number > 0",
        )?;
        non_negative(&format!("{prefix}.weight_decay"), self.weight_decay)?;
        in_range(
            &format!("{prefix}.final_lr_ratio"),
            self.final_lr_ratio,
            |v| (0.0..=1.0).contains(&v),
            "in [0, 1]",
        )?;
        non_negative(&format!("{prefix}.grad_clip"), self.grad_clip)?;
        at_most(
            &format!("{prefix}.warmup_steps"),
            self.warmup_steps,
            limits::STEPS,
        )
    }
}

impl PruningSettings {
    /// The masks' and multipliers' learning rates.
    pub fn check_ranges(&self, prefix: &str) -> std::result::Result<(), String> {
        non_negative(&format!("{prefix}.mask_lr"), self.mask_lr)?;
        non_negative(&format!("{prefix}.multiplier_lr"), self.multiplier_lr)?;
        if self.calib == 0 {
            return Err(format!(
                "{prefix}.calib = 0: importance needs at least one calibration sequence"
            ));
        }
        at_most(&format!("{prefix}.calib"), Some(self.calib), 1 << 20)?;
        at_most(
            &format!("{prefix}.lagrangian_warmup_steps"),
            self.lagrangian_warmup_steps,
            limits::STEPS,
        )
    }
}

impl DblSettings {
    /// The reweighting rule's constants, given reference losses and starting weights.
    pub fn check_ranges(&self, prefix: &str) -> std::result::Result<(), String> {
        if let RuleConfig::Code { eta, smoothing } = self.rule {
            in_range(
                &format!("{prefix}.rule.eta"),
                eta,
                |v| v > 0.0,
                "a finite number > 0",
            )?;
            in_range(
                &format!("{prefix}.rule.smoothing"),
                smoothing,
                |v| (0.0..1.0).contains(&v),
                "in [0, 1)",
            )?;
        }
        match &self.reference {
            ReferenceSource::Given { losses } => {
                for (d, l) in losses {
                    non_negative(&format!("{prefix}.reference.losses.{d}"), *l)?;
                }
            }
            ReferenceSource::ScalingLaw {
                points,
                target_params,
            } => {
                in_range(
                    &format!("{prefix}.reference.target_params"),
                    *target_params,
                    |v| v > 0.0,
                    "a finite number > 0",
                )?;
                for p in points {
                    in_range(
                        &format!("{prefix}.reference.points.params"),
                        p.params,
                        |v| v > 0.0,
                        "a finite number > 0",
                    )?;
                    for (d, l) in &p.losses {
                        non_negative(&format!("{prefix}.reference.points.losses.{d}"), *l)?;
                    }
                }
            }
            ReferenceSource::SourceModel => {}
        }
        for (d, w) in self.initial_weights.iter().flatten() {
            non_negative(&format!("{prefix}.initial_weights.{d}"), *w)?;
        }
        Ok(())
    }
}

impl CheckRanges for PruneConfig {
    fn check_ranges(&self) -> std::result::Result<(), String> {
        self.run.check_ranges("run")?;
        self.optim.check_ranges("optim")?;
        self.pruning.check_ranges("pruning")?;
        self.dbl.check_ranges("dbl")?;
        self.distill.check_ranges("distill")
    }
}

impl CheckRanges for TrainConfig {
    fn check_ranges(&self) -> std::result::Result<(), String> {
        self.run.check_ranges("run")?;
        self.optim.check_ranges("optim")?;
        self.dbl.check_ranges("dbl")?;
        self.distill.check_ranges("distill")
    }
}

/// The smallest distillation temperature accepted: logit gaps of a few units divided by it
/// already exceed f32's exp range (e^-104), so a lower one makes the KD term a no-op.
pub const MIN_TEMPERATURE: f64 = 0.01;

impl DistillSettings {
    /// `alpha` in [0, 1], a positive finite temperature, `top_k` at most a vocabulary's size,
    /// a non-empty teacher.
    pub fn check_ranges(&self, prefix: &str) -> std::result::Result<(), String> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(format!(
                "{prefix}.alpha = {} must be between 0 and 1 (the KD term's weight; the LM loss gets 1 - alpha)",
                self.alpha
            ));
        }
        if !(self.temperature.is_finite()
            && self.temperature >= MIN_TEMPERATURE
            && self.temperature <= 1e3)
        {
            return Err(format!(
                "{prefix}.temperature = {} must be between {MIN_TEMPERATURE} and 1000 (below, \
                 logits divided by it saturate both softmaxes to one-hot in f32: the KD term is 0 \
                 with no gradient)",
                self.temperature
            ));
        }
        if self.top_k == 1 {
            return Err(format!(
                "{prefix}.top_k = 1 keeps one logit: both renormalised distributions are 1 there, \
                 so the KD term is 0 with no gradient; use 0 (every logit) or at least 2"
            ));
        }
        if self.top_k > limits::VOCAB {
            return Err(format!(
                "{prefix}.top_k = {} is larger than any vocabulary (at most {})",
                self.top_k,
                limits::VOCAB
            ));
        }
        if matches!(&self.teacher, Some(t) if t.trim().is_empty()) {
            return Err(format!(
                "{prefix}.teacher is empty: give \"source\" or a model"
            ));
        }
        Ok(())
    }
}

impl RunSettings {
    /// Check what can be checked without the data.
    pub fn validate(&self) -> Result<()> {
        self.check_ranges("run").map_err(Error::invalid)
    }

    /// [`RunSettings::validate`] with the settings named under `prefix` (`run`, `prune.run`).
    pub fn check_ranges(&self, prefix: &str) -> std::result::Result<(), String> {
        let bad = |m: String| Err(m.replace("run.", &format!("{prefix}.")));
        for (name, v, max) in [
            ("run.batch_size", Some(self.batch_size), limits::BATCH),
            ("run.micro_batch", self.micro_batch, limits::BATCH),
            ("run.eval_batch", Some(self.eval_batch), limits::BATCH),
            ("run.steps", Some(self.steps), limits::STEPS),
            ("run.eval_interval", self.eval_interval, limits::STEPS),
            (
                "run.checkpoint_interval",
                self.checkpoint_interval,
                limits::STEPS,
            ),
            (
                "run.keep_checkpoints",
                Some(self.keep_checkpoints),
                limits::STEPS,
            ),
            ("run.max_bad_steps", Some(self.max_bad_steps), limits::STEPS),
            ("run.seq_len", self.seq_len, limits::SEQ_LEN),
            ("run.eval_seq_len", self.eval_seq_len, limits::SEQ_LEN),
        ] {
            at_most(name, v, max).or_else(bad)?;
        }
        if self.eval_batch == 0 || self.eval_sequences == Some(0) {
            return bad("run.eval_batch and run.eval_sequences must be at least 1".into());
        }
        if self.steps == 0 {
            return bad("run.steps must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("run.batch_size must be at least 1".into());
        }
        let micro = self.micro_batch.unwrap_or(self.batch_size);
        if micro == 0 || !self.batch_size.is_multiple_of(micro) {
            return bad(format!(
                "run.micro_batch ({micro}) must divide run.batch_size ({})",
                self.batch_size
            ));
        }
        if self.devices == 0 || self.devices > limits::DEVICES {
            return bad(format!(
                "run.devices = {} must be between 1 and {}",
                self.devices,
                limits::DEVICES
            ));
        }
        if self.batch_size / micro < self.devices {
            return bad(format!(
                "run.devices = {} but a step has only {} micro-batch(es) (run.batch_size {} / run.micro_batch {micro}); every device needs at least one: raise run.batch_size or lower run.micro_batch",
                self.devices,
                self.batch_size / micro,
                self.batch_size
            ));
        }
        in_range(
            "run.collective_timeout_s",
            self.collective_timeout_s,
            |v| v > 0.0 && v <= 1e9,
            "a number of seconds in (0, 1e9]",
        )
        .or_else(bad)?;
        if self.eval_interval == Some(0) || self.checkpoint_interval == Some(0) {
            return bad("run.eval_interval and run.checkpoint_interval must be at least 1".into());
        }
        if self.keep_checkpoints == 0 {
            return bad("run.keep_checkpoints must be at least 1".into());
        }
        if self.max_bad_steps == 0 {
            return bad("run.max_bad_steps must be at least 1".into());
        }
        if matches!(self.seq_len, Some(n) if n < 2) || matches!(self.eval_seq_len, Some(n) if n < 2)
        {
            return bad("sequence lengths must be at least 2 tokens".into());
        }
        Ok(())
    }
}
