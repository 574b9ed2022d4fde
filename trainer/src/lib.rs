//! # shears-trainer
//!
//! Training: the pruning stage and continued pre-training, with what a long run needs around
//! them. It owns:
//!
//! - [`lm_step`] / [`prune_step`]: single optimisation steps (kept for tests and benchmarks);
//! - [`config`]: the TOML run plans and their defaults (method §7);
//! - [`driver`]: the shared loop (batches from the domain sampler, accumulation, global-norm
//!   clipping, the cosine schedule, per-domain eval and dynamic batch loading, guards, signals);
//! - [`prune_stage`] / [`lm_stage`]: what differs between the two stages;
//! - [`checkpoint`] / [`run_dir`]: atomic checkpoints and the run directory, for exact resume;
//! - [`params`]: parameters by name (clipping, optimizer state across restarts);
//! - [`eval`]: per-domain eval loss; [`jobs`]: whole stages as the CLI runs them;
//! - [`pipeline`]: `shears run` and the demo's plan runner; [`report`]: plots and an HTML page;
//! - [`zeroshot`]: zero-shot multiple-choice and LAMBADA evaluation (lm-eval conventions).
//!
//! It must not reach into file formats or model internals beyond the public APIs of `core`,
//! `models`, `pruning` and `data`.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config;
pub mod driver;
pub mod eval;
pub mod jobs;
pub mod lm_stage;
pub mod lm_step;
pub mod optim;
pub mod params;
pub mod pipeline;
pub mod prune_stage;
pub mod prune_step;
pub mod report;
pub mod run_dir;
pub mod schedule;
pub mod zeroshot;

pub use config::{PruneConfig, TrainConfig};
pub use driver::Outcome;
pub use lm_step::LmTrainer;
pub use optim::AdamWSettings;
pub use prune_step::{PruneStepSettings, PruneTrainer};
