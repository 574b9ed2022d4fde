//! The cross-crate integration tests, one module per subject, in one test binary: the
//! backend-generic model and trainer code is compiled once for all of them instead of once
//! per file (each file was its own binary, and each spent up to 70 s of a 2-core build on the
//! same monomorphizations). Four files stay separate binaries: `backends` and
//! `compute_settings`, which the wgpu CI step and the CUDA device check build with other
//! backend features, and `distill` and `prune_fd`, which run NdArray<f64> and must have their
//! process to themselves (burn keeps one default float type per device, and NdArray<f32> and
//! NdArray<f64> share the CPU device: in this binary they turned f32 tests' tensors into f64).
//!
//! One subject: `cargo test -p shears-tests --test integration zeroshot::`.

mod data_prepare;
mod data_sampler;
mod dequant;
mod families;
mod formats;
mod fused_kernels;
mod fuzz_parsers;
mod gguf_export;
mod importance;
mod mmlu;
mod prune_equivalence;
mod prune_gradients;
mod roundtrip;
mod smollm2_parity;
mod tokenizer_gguf;
mod train_parity;
mod trainer_steps;
mod zeroshot;
