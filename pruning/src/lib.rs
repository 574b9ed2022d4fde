//! # shears-pruning
//!
//! Targeted structured pruning (`docs/method.md` §1-§4, §6, §11), in the order a run
//! uses it:
//!
//! - [`target`]: the target shape, its validation against the source, which modules carry masks;
//! - [`hard_concrete`]: the L0 distribution (sampling, scores, deterministic masks);
//! - [`per_module`]: the per-module map every mask quantity travels in;
//! - [`masks`]: the mask module (`log_alpha`s) and the multipliers it hands the model;
//! - [`size`]: parameter accounting and the expected remaining size;
//! - [`constraint`]: the per-module Lagrangian and its multipliers;
//! - [`model`]: the three parameter groups (weights, masks, multipliers) of a pruning run;
//! - [`finalize`](mod@finalize): folding deterministic masks into the weights and slicing out the dense model;
//! - [`plan`]: the pre-flight report of `shears plan`;
//! - [`importance`]: activation importance, importance-initialised masks and one-shot pruning.
//!
//! It must not own training loops or data: the trainer drives it. Mask math is f32 (or wider)
//! whatever the model's dtype.
#![forbid(unsafe_code)]

pub mod constraint;
pub mod finalize;
pub mod hard_concrete;
pub mod importance;
pub mod masks;
pub mod memory;
pub mod model;
pub mod per_module;
pub mod plan;
pub mod size;
pub mod target;

pub use constraint::Lagrangian;
pub use finalize::{finalize, FinalizeOptions};
pub use importance::Importance;
pub use masks::{HostMasks, L0Masks, MaskValues};
pub use model::PruningModel;
pub use per_module::PerModule;
pub use target::{PruneModule, PruningSpec, TargetShape};
