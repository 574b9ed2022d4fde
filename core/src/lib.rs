//! # shears-core
//!
//! What every Shears crate shares and nothing that needs a tensor backend: the model config (an HF
//! `config.json`), host-side tensors, the error type, the file formats (safetensors, GGUF read
//! with dequantisation and written with quantisation, HF model directories), tokenizers and chat
//! templates, and atomic output directories. It must not depend on burn: format code stays testable without a backend and
//! quick to build.

// Unsafe code only where it is named (the read-only memory maps of model files).
#![deny(unsafe_code)]

pub mod config;
pub mod error;
pub mod family;
pub mod formats;
pub mod fsutil;
pub mod gguf_export;
pub mod hub;
pub mod layer_tensors;
pub mod model_files;
pub mod tensor;
pub mod tokenizer;

pub use config::{Activation, Family, LayerShape, LlamaConfig, Rope, RopeScaling};
pub use error::{Error, Result};
pub use layer_tensors::{Axis, LayerTensor};
pub use model_files::ModelFiles;
pub use tensor::{DType, HostData, HostTensor, WeightMap};
pub use tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
