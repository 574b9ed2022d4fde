//! File formats, each in one place: safetensors, GGUF (with ggml dequantisation), and the GGUF
//! LLaMA to HF conversion.

pub mod dequant;
pub mod gguf;
pub mod gguf_llama;
pub mod safetensors;
