//! The files a run writes and reads back, as types shared by their writers and readers:
//!
//! - `metrics.jsonl`: one [`MetricRecord`] per line (the reference losses, every step, every
//!   evaluation);
//! - a checkpoint's `state.json`: [`LoopState`], the loop's state plus the stage's own
//!   ([`StageState`]);
//! - a pipeline's `stages.json`: [`StagesFile`], one entry per finished [`PipelineStage`].
//!
//! The JSON layout is the one earlier versions wrote with untyped maps, so existing runs resume.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shears_core::{Error, Result};
use shears_data::dbl::DomainValues;
use shears_data::SamplerState;
use shears_pruning::{PerModule, PruneModule, TargetShape};

use crate::config::StageKind;
use shears_eval::domain::DomainEval;

/// File names inside a run directory.
pub const PLAN: &str = "plan.toml";
pub const RESOLVED: &str = "resolved.toml";
pub const METRICS: &str = "metrics.jsonl";
pub const LOG: &str = "log.txt";
pub const CHECKPOINTS: &str = "checkpoints";

/// A number JSON may not hold: non-finite values are written as strings (`"NaN"`, `"inf"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Num(pub f64);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            s.serialize_f64(self.0)
        } else {
            s.serialize_str(&self.0.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or \"NaN\" / \"inf\" / \"-inf\"")
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Num, E> {
                Ok(Num(v as f64))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Num, E> {
                Ok(Num(v as f64))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Num, E> {
                match v.parse::<f64>() {
                    Ok(x) if !x.is_finite() => Ok(Num(x)),
                    _ => Err(E::custom(format!("'{v}' is not NaN or ±inf"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricRecord {
    /// The reference losses a fresh run starts with (step 0).
    Reference(ReferenceRecord),
    /// One optimizer step.
    Step(StepRecord),
    /// One per-domain evaluation and the domain-weight update after it.
    Eval(Box<EvalRecord>),
}

/// The reference losses dynamic batch loading compares against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceRecord {
    pub step: usize,
    pub reference_loss: DomainValues,
}

/// One optimizer step (losses are means over its micro-batches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Steps done after this one (1-based).
    pub step: usize,
    /// The objective: `lm_loss`, or `(1 − alpha)·lm_loss + alpha·kd_loss` when distilling,
    /// plus the Lagrangian term when pruning.
    pub loss: Num,
    pub lm_loss: Num,
    /// The pruning stage's Lagrangian term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lagrangian_loss: Option<Num>,
    /// The distillation term (`T²`-scaled divergence from the teacher), when distilling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kd_loss: Option<Num>,
    /// The model weights' learning rate.
    pub lr: f64,
    /// The schedule's multiplier.
    pub lr_scale: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: Num,
    pub tokens: usize,
    /// The step was not applied (non-finite loss or gradient).
    pub skipped: bool,
    pub tokens_per_s: f64,
    pub step_s: f64,
    /// Seconds rank 0 spent in the step's collectives (gradient and loss all-reduces, waiting
    /// for the other ranks included); data-parallel runs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collective_s: Option<f64>,
}

/// What a stage adds to an eval record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalExtras {
    /// Parameters of the model (continued pre-training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<usize>,
    /// The masks' state (pruning).
    #[serde(flatten)]
    pub pruning: Option<PruningProgress>,
}

/// Where the masks stand at an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruningProgress {
    /// Expected sparsity of each module's deterministic-in-expectation mask.
    pub expected_sparsity: PerModule<f64>,
    /// The target sparsity the constraint asks for at this step (ramped).
    pub target_sparsity: PerModule<f64>,
    /// The final target sparsity.
    pub final_target_sparsity: PerModule<f64>,
    /// `[λ₁, λ₂]` per module.
    pub lambda: PerModule<[f32; 2]>,
    pub expected_prunable_params: f64,
    pub target_prunable_params: u64,
    pub source_prunable_params: u64,
}

/// One per-domain evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Steps done when it ran.
    pub step: usize,
    /// Mean token cross-entropy per domain.
    pub domain_loss: DomainValues,
    /// Tokens scored per domain.
    pub domain_tokens: BTreeMap<String, u64>,
    pub reference_loss: DomainValues,
    /// `domain_loss − reference_loss`.
    pub excess_loss: DomainValues,
    /// Sampling weights before and after the update.
    pub weights_before: DomainValues,
    pub domain_weights: DomainValues,
    /// The reweighting rule's name.
    pub rule: String,
    #[serde(flatten)]
    pub extras: EvalExtras,
    /// Seconds the evaluation took.
    pub eval_s: f64,
}

/// The version tag of `state.json`.
pub const STATE_FORMAT: &str = "shears-checkpoint/1";

/// A checkpoint's `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub format: String,
    /// Optimizer steps taken.
    pub step: usize,
    /// The run is complete (final eval and checkpoint written).
    pub finished: bool,
    /// Length of `metrics.jsonl` when the checkpoint was written.
    pub metrics_bytes: u64,
    pub sampler: SamplerState,
    pub reference_losses: DomainValues,
    /// Consecutive non-finite steps so far.
    pub bad_steps: usize,
    /// Which stage, and its own state (`stage` and `stage_state` in the file).
    #[serde(flatten)]
    pub stage: StageState,
}

/// The stage's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", content = "stage_state", rename_all = "lowercase")]
pub enum StageState {
    Prune(PruneState),
    Train(TrainState),
}

impl StageState {
    /// Which stage wrote it.
    pub fn kind(&self) -> StageKind {
        match self {
            StageState::Prune(_) => StageKind::Prune,
            StageState::Train(_) => StageKind::Train,
        }
    }
}

/// The pruning stage's state beside its tensor files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneState {
    /// AdamW step counts per parameter group.
    pub optimizer_steps: BTreeMap<String, usize>,
    /// The target the masks are trained towards.
    pub target: TargetShape,
    /// The masked modules.
    pub modules: Vec<PruneModule>,
}

/// Continued pre-training's state beside its tensor files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// AdamW step counts per parameter group.
    pub optimizer_steps: BTreeMap<String, usize>,
}

impl LoopState {
    /// Read a checkpoint's `state.json`.
    pub fn read(dir: &Path) -> Result<LoopState> {
        let p = dir.join("state.json");
        let text = shears_core::fsutil::read_text(&p, shears_core::fsutil::SETTINGS_FILE_BYTES)?;
        let s: LoopState =
            serde_json::from_str(&text).map_err(|e| Error::format(&p, format!("invalid: {e}")))?;
        if s.format != STATE_FORMAT {
            return Err(Error::format(&p, format!("unknown format '{}'", s.format)));
        }
        s.check().map_err(|m| Error::format(&p, m))?;
        Ok(s)
    }

    /// What a state must satisfy whatever the plan: reference losses that are finite and
    /// non-negative, a sampler state that is one ([`SamplerState::validate`]), counts that fit
    /// the step. (The step against the plan's `steps` is checked where the plan is known.)
    pub fn check(&self) -> std::result::Result<(), String> {
        for (d, l) in &self.reference_losses {
            if !l.is_finite() || *l < 0.0 {
                return Err(format!(
                    "reference loss {l} of domain '{d}' is not a non-negative number"
                ));
            }
        }
        if self.bad_steps > self.step {
            return Err(format!(
                "{} consecutive bad steps after only {} steps",
                self.bad_steps, self.step
            ));
        }
        let groups = match &self.stage {
            StageState::Prune(p) => &p.optimizer_steps,
            StageState::Train(t) => &t.optimizer_steps,
        };
        if let Some((g, n)) = groups.iter().find(|(_, n)| **n > self.step) {
            return Err(format!(
                "optimizer group '{g}' took {n} steps in a run of {} steps",
                self.step
            ));
        }
        self.sampler.validate()
    }

    /// The text written to `state.json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a LoopState always serializes")
    }

    /// The pruning state, or an error naming `dir` when the checkpoint is of another stage.
    pub fn pruning(&self, dir: &Path) -> Result<&PruneState> {
        match &self.stage {
            StageState::Prune(p) => Ok(p),
            StageState::Train(_) => Err(Error::format(
                dir,
                "is a 'train' checkpoint, not a pruning one",
            )),
        }
    }
}

/// The steps of `shears run`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineStage {
    EvalSource,
    Prune,
    Finalize,
    EvalPruned,
    Train,
    Export,
    EvalTrained,
}

impl PipelineStage {
    /// Every stage in the order they run.
    pub const ALL: [PipelineStage; 7] = [
        PipelineStage::EvalSource,
        PipelineStage::Prune,
        PipelineStage::Finalize,
        PipelineStage::EvalPruned,
        PipelineStage::Train,
        PipelineStage::Export,
        PipelineStage::EvalTrained,
    ];

    /// The name in `stages.json` and the log.
    pub fn name(self) -> &'static str {
        match self {
            PipelineStage::EvalSource => "eval source",
            PipelineStage::Prune => "prune",
            PipelineStage::Finalize => "finalize",
            PipelineStage::EvalPruned => "eval pruned",
            PipelineStage::Train => "train",
            PipelineStage::Export => "export",
            PipelineStage::EvalTrained => "eval trained",
        }
    }
}

/// What a finished pipeline stage left behind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StageDone {
    /// A training loop: its steps and wall time.
    Loop { steps: usize, seconds: f64 },
    /// Finalize: the checkpoint it read and the pruned model's parameter count.
    Finalized { checkpoint: PathBuf, params: u64 },
    /// An evaluation: per-domain results, with each loss's exact bits (hex) so a resumed
    /// pipeline reports exactly what an uninterrupted one does.
    Evaluated {
        domains: BTreeMap<String, DomainEval>,
        loss_bits: BTreeMap<String, String>,
        seconds: f64,
    },
    /// Export: the checkpoint it exported.
    Exported { checkpoint: PathBuf },
}

/// `stages.json`: the stages a pipeline has finished.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StagesFile(pub BTreeMap<PipelineStage, StageDone>);

impl StagesFile {
    /// Read `path`.
    pub fn read(path: &Path) -> Result<StagesFile> {
        let text = shears_core::fsutil::read_text(path, shears_core::fsutil::SETTINGS_FILE_BYTES)?;
        serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid: {e}")))
    }
}

/// An evaluation as `stages.json` keeps it.
pub fn evaluated(domains: &BTreeMap<String, DomainEval>, seconds: f64) -> StageDone {
    StageDone::Evaluated {
        domains: domains.clone(),
        loss_bits: domains
            .iter()
            .map(|(k, d)| (k.clone(), format!("{:016x}", d.loss.to_bits())))
            .collect(),
        seconds,
    }
}

/// The per-domain results of an [`StageDone::Evaluated`], with the exact loss bits restored.
pub fn evaluation(done: &StageDone) -> Option<BTreeMap<String, DomainEval>> {
    let StageDone::Evaluated {
        domains, loss_bits, ..
    } = done
    else {
        return None;
    };
    let mut e = domains.clone();
    for (domain, d) in e.iter_mut() {
        if let Some(bits) = loss_bits
            .get(domain)
            .and_then(|b| u64::from_str_radix(b, 16).ok())
        {
            d.loss = f64::from_bits(bits);
        }
    }
    Some(e)
}

/// One model's line of the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub params: u64,
    pub config: ShapeSummary,
    pub per_domain_ppl: BTreeMap<String, f64>,
    pub per_domain_loss: BTreeMap<String, f64>,
}

/// A model's shape in a summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeSummary {
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
}

/// A pipeline's `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub source: ModelSummary,
    pub pruned: ModelSummary,
    pub trained: ModelSummary,
    pub export_dir: PathBuf,
}

/// Read every record of a run's `metrics.jsonl`.
pub fn read_metrics(root: &Path) -> Result<Vec<MetricRecord>> {
    let p = root.join(METRICS);
    // A run's own log: one line per step and eval (about 1 KB each).
    let text = shears_core::fsutil::read_text(&p, 4 << 30)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::format(&p, format!("line {}: invalid record: {e}", i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_numbers_are_strings_and_come_back() {
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1.5, -0.0] {
            let s = serde_json::to_string(&Num(x)).unwrap();
            assert_eq!(s.starts_with('"'), !x.is_finite(), "{s}");
            let back: Num = serde_json::from_str(&s).unwrap();
            assert_eq!(back.0.to_bits(), x.to_bits());
        }
        assert!(serde_json::from_str::<Num>("\"12\"").is_err());
    }

    #[test]
    fn records_keep_the_layout_earlier_runs_wrote() {
        let old = r#"{"domain_loss":{"a":2.5},"domain_tokens":{"a":10},"domain_weights":{"a":1.0},
            "eval_s":0.1,"excess_loss":{"a":0.5},"expected_prunable_params":100.0,
            "expected_sparsity":{"layer":0.25},"final_target_sparsity":{"layer":0.5},
            "kind":"eval","lambda":{"layer":[0.1,0.2]},"reference_loss":{"a":2.0},"rule":"sheared",
            "source_prunable_params":200,"step":50,"target_prunable_params":100,
            "target_sparsity":{"layer":0.3},"weights_before":{"a":1.0}}"#;
        let r: MetricRecord = serde_json::from_str(old).unwrap();
        let MetricRecord::Eval(e) = &r else {
            panic!("{r:?}")
        };
        let p = e.extras.pruning.as_ref().unwrap();
        assert_eq!(p.lambda[PruneModule::Layer], [0.1, 0.2]);
        assert_eq!(e.extras.params, None);
        // As written to the file (f32 multipliers print as typed, not widened to f64).
        let again: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        let want: serde_json::Value = serde_json::from_str(old).unwrap();
        assert_eq!(again, want);

        let step = r#"{"kind":"step","step":3,"loss":"NaN","lm_loss":"NaN","lr":0.001,"lr_scale":1.0,
            "grad_norm":"inf","tokens":64,"skipped":true,"tokens_per_s":10.0,"step_s":6.4}"#;
        let r: MetricRecord = serde_json::from_str(step).unwrap();
        let MetricRecord::Step(s) = &r else {
            panic!("{r:?}")
        };
        assert!(s.loss.0.is_nan() && s.grad_norm.0.is_infinite() && s.skipped);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::from_str::<serde_json::Value>(step).unwrap()
        );
        let train = r#"{"kind":"eval","step":0,"domain_loss":{},"domain_tokens":{},"reference_loss":{},
            "excess_loss":{},"weights_before":{},"domain_weights":{},"rule":"sheared","params":7,"eval_s":0.0}"#;
        let MetricRecord::Eval(e) = serde_json::from_str(train).unwrap() else {
            panic!()
        };
        assert_eq!(e.extras.params, Some(7));
        assert!(e.extras.pruning.is_none());
    }

    #[test]
    fn stages_file_round_trips() {
        let mut s = StagesFile::default();
        let d: BTreeMap<String, DomainEval> = [(
            "web".to_string(),
            DomainEval {
                loss: 1.0 / 3.0,
                tokens: 9,
            },
        )]
        .into();
        s.0.insert(PipelineStage::EvalSource, evaluated(&d, 1.5));
        s.0.insert(
            PipelineStage::Prune,
            StageDone::Loop {
                steps: 4,
                seconds: 2.0,
            },
        );
        s.0.insert(
            PipelineStage::Finalize,
            StageDone::Finalized {
                checkpoint: "a/b".into(),
                params: 12,
            },
        );
        s.0.insert(
            PipelineStage::Export,
            StageDone::Exported {
                checkpoint: "c".into(),
            },
        );
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"eval_source\""), "{text}");
        let back: StagesFile = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            evaluation(&back.0[&PipelineStage::EvalSource]).unwrap()["web"].loss,
            1.0 / 3.0
        );
    }
}
