//! How a stage computes, whatever it computes: numeric precision, the precision of AdamW's
//! moments, and activation checkpointing (the settings `shears plan`'s memory model counts).
//!
//! - `precision = "bf16-mixed"`: the parameters stay f32 (they are the master weights the
//!   optimizer steps, the checkpoint stores and the gradients arrive in); the forward casts each
//!   weight to bf16 where it is used and runs activations, matmuls and their backward in bf16,
//!   while norms, softmax and the loss reduce in f32. bf16 has f32's exponent range, so no loss
//!   scaling. Masks' `log_alpha` and the multipliers are untouched (f32), their sampled gates
//!   are cast to bf16 where they multiply activations.
//! - `optimizer_state = "bf16"`: AdamW's moments are stored in bf16 and widened to f32 for each
//!   update (half the optimizer memory; the update itself is f32).
//! - `checkpointing = "layers"`: [`shears_models::recompute::backward_by_layers`].

use burn::tensor::DType;
use serde::{Deserialize, Serialize};
pub use shears_pruning::memory::{Checkpointing, Precision, StatePrecision};

/// The compute settings of one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Compute {
    pub precision: Precision,
    pub optimizer_state: StatePrecision,
    pub checkpointing: Checkpointing,
}

impl Compute {
    /// The dtype the forward runs in when it differs from the f32 parameters.
    pub fn autocast(&self) -> Option<DType> {
        match self.precision {
            Precision::F32 => None,
            Precision::Bf16Mixed => Some(DType::BF16),
        }
    }

    /// The dtype AdamW keeps its moments in, when not f32.
    pub fn state_dtype(&self) -> Option<DType> {
        match self.optimizer_state {
            StatePrecision::F32 => None,
            StatePrecision::Bf16 => Some(DType::BF16),
        }
    }

    /// Whether the backward pass recomputes layers from their inputs.
    pub fn by_layers(&self) -> bool {
        self.checkpointing == Checkpointing::Layers
    }
}
