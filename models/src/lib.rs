//! # shears-models
//!
//! The decoder of every supported family (LLaMA, Mistral, Qwen2, Qwen3, Gemma 3) on burn, generic
//! over the backend: one model definition for CPU, wgpu and CUDA. It owns the modules (HF-named,
//! with each family's options), the forward pass and KV cache, the activation taps at the mask
//! points ([`taps`]), RoPE, the causal-LM loss,
//! scoring and generation, conversion between host weights and device parameters, and the
//! run-time backend choice, and the fused operations behind the [`ShearsOps`] backend extension
//! (native CPU kernels for attention and the LM-head cross-entropy, with their backward). It must not know about pruning, data or training loops; those crates
//! build on it.

pub mod backend;
pub mod cache;
pub mod distill;
pub mod generate;
pub mod llama;
pub mod load;
pub mod loss;
pub mod masks;
pub mod ops;
pub mod recompute;
pub mod rope;
pub mod taps;

pub use backend::{dispatch, dispatch_autodiff, AutodiffTask, BackendKind, BackendTask};
pub use cache::{KvCache, LayerCache};
pub use llama::Llama;
pub use masks::ForwardMasks;
pub use ops::{ShearsAutodiff, ShearsOps};
