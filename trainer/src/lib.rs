//! # shears-trainer
//!
//! Training loops. Today it owns one language-model optimisation step (causal-LM loss, backward,
//! PyTorch-compatible AdamW), which the training-parity test and the benchmarks use. The pruning
//! stage and continued pre-training loops will live here; it must not reach into file formats or
//! model internals beyond the public model API.

pub mod lm_step;
pub mod optim;

pub use lm_step::LmTrainer;
pub use optim::AdamWSettings;
