//! # shears-eval
//!
//! Evaluation of a model as it is, for the trainer, the CLI and the tests. It owns:
//!
//! - [`domain`]: per-domain eval loss and perplexity on a prepared dataset's eval shards (the
//!   number the trainer logs and dynamic batch loading reads, method §5.3);
//! - [`zeroshot`]: zero-shot multiple-choice and LAMBADA evaluation with lm-eval conventions
//!   (method §8): loading the request sets, scoring them in batches, the metrics;
//! - [`mmlu`]: MMLU's 5-shot OLMES formats (rc and mc) built from the package's Arrow data;
//! - [`report`]: a whole evaluation as one typed report, and lm-eval's `results.json` from it.
//!
//! It takes a model (or a forward function) and data; it must not know about training, run
//! directories or checkpoints (the trainer's `checkpoint::Checkpoint` reads those).
#![forbid(unsafe_code)]

pub mod domain;
pub mod mmlu;
pub mod report;
pub mod zeroshot;

/// Every task name `shears eval --tasks` takes: the 0-shot request-file tasks
/// ([`zeroshot::TASKS`]) and MMLU's ([`mmlu::TASKS`]).
pub fn task_names() -> Vec<&'static str> {
    zeroshot::TASKS
        .iter()
        .map(|t| t.0)
        .chain(mmlu::TASKS.iter().map(|t| t.0))
        .collect()
}

pub use domain::{DomainEval, EvalSettings};
