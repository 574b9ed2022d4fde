//! # shears-data
//!
//! The data side of the pipeline (`docs/method.md` §5), in the order a run uses it:
//!
//! - [`documents`]: reading a domain's input files into documents;
//! - [`plan`]: the data plan;
//! - [`prepare`](mod@prepare): tokenizing, splitting train/eval by document, packing into token shards;
//! - [`manifest`] and [`shards`]: the prepared dataset on disk, memory-mapped;
//! - [`sampler`]: deterministic, resumable, rank-aware per-sample domain draws;
//! - [`dbl`]: dynamic batch loading (reweighting rules and reference losses).
//!
//! It must not run models (the trainer measures losses and hands them to [`dbl`]) or reach the
//! network (the demo corpus fetcher is the CLI's).
// Unsafe code only where it is named (the read-only memory maps of token shards).
#![deny(unsafe_code)]

pub mod dbl;
pub mod documents;
pub mod manifest;
pub mod plan;
pub mod prepare;
pub mod sampler;
pub mod shards;

pub use dbl::{ReferenceSource, ReweightRule, RuleConfig};
pub use manifest::Manifest;
pub use prepare::{prepare, DataPlan, DomainPlan};
pub use sampler::{DomainSampler, Exhaustion, SamplerConfig, SamplerState};
pub use shards::{Dataset, Split};
