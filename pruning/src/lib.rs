//! # shears-pruning
//!
//! Will own targeted structured pruning (`../shared/shearing-spec.md` §1-§4, §6, §11):
//! hard-concrete (L0) masks over hidden channels, layers, MLP channels and GQA-aware attention
//! groups; expected-size accounting and the per-module Lagrangian with multipliers trained by
//! gradient ascent; target shapes; and finalize, which folds deterministic masks into the weights
//! and slices out a dense model of exactly the target shape.
//!
//! Nothing is implemented yet (the pruning-core issue fills it). It must not own training loops
//! or data: the trainer drives it.
