//! # shears-trainer
//!
//! Training loops. Today it owns single optimisation steps: the causal-LM step (loss, backward,
//! PyTorch-compatible AdamW) and the pruning step (masked forward, Lagrangian, three parameter
//! groups with ascent on the multipliers). The full pruning and continued pre-training loops
//! will live here; it must not reach into file formats or
//! model internals beyond the public model API.

pub mod lm_step;
pub mod optim;
pub mod prune_step;

pub use lm_step::LmTrainer;
pub use optim::AdamWSettings;
pub use prune_step::{PruneStepSettings, PruneTrainer};
