//! # shears-trainer
//!
//! Training: the pruning stage and continued pre-training, with what a long run needs around
//! them. It owns:
//!
//! - [`calibrate`]: calibration sequences and importance scores for a pruning run;
//! - [`compute`]: precision (f32 or bf16-mixed), optimizer-state precision, activation
//!   checkpointing;
//! - [`config`]: the TOML run plans and their defaults (method §7);
//! - [`driver`]: the shared loop (batches from the domain sampler, accumulation, global-norm
//!   clipping, the cosine schedule, per-domain eval and dynamic batch loading, guards, signals);
//! - [`prune_stage`] / [`lm_stage`]: what differs between the two stages: the one step
//!   implementation production, the PyTorch parity tests and the benchmarks all run;
//! - [`teacher`]: the distillation teacher and the objective both stages share;
//! - [`checkpoint`] / [`run_dir`]: atomic checkpoints and the run directory, for exact resume;
//!   [`checkpoint::Checkpoint`] is how everything outside the loop reads a run's checkpoint;
//! - [`params`]: parameters by name (clipping, optimizer state across restarts, all-reduce);
//! - [`parallel`]: data parallelism on burn-collective (ranks, reductions, failure handling);
//! - [`jobs`]: whole stages as the CLI runs them;
//! - [`pipeline`]: `shears run` and the demo's plan runner;
//! - [`records`]: the run files (`metrics.jsonl`, `state.json`, `stages.json`) as types shared
//!   by their writers and readers (the CLI's report reads them).
//!
//! Evaluation itself (per-domain loss, zero-shot) is `shears-eval`'s; report rendering is the
//! CLI's.
//!
//! It must not reach into file formats or model internals beyond the public APIs of `core`,
//! `models`, `pruning`, `data` and `eval`.
#![forbid(unsafe_code)]

pub mod calibrate;
pub mod checkpoint;
pub mod compute;
pub mod config;
pub mod driver;
pub mod inputs;
pub mod jobs;
pub mod lm_stage;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod pipeline;
pub mod prune_stage;
pub mod records;
pub mod run_dir;
pub mod schedule;
pub mod teacher;

pub use compute::Compute;
pub use config::{PruneConfig, TrainConfig};
pub use driver::Outcome;
pub use driver::Stage;
pub use lm_stage::LmStage;
pub use optim::AdamWSettings;
pub use prune_stage::{PruneRates, PruneStage};
