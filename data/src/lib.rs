//! # shears-data
//!
//! Will own the data side of the pipeline (`../shared/shearing-spec.md` §5): tokenizing
//! multi-domain corpora into token shards, deterministic per-domain sampling with exact resumable
//! state, and dynamic batch loading (domain weights that follow each domain's excess loss over a
//! reference loss).
//!
//! Nothing is implemented yet (the data issue fills it). It must not run models: the trainer
//! feeds it losses.
