//! File formats, each in one place: safetensors, GGUF (with ggml dequantisation), and the GGUF
//! LLaMA and tokenizer to HF conversions.

pub mod dequant;
pub mod gguf;
pub mod gguf_llama;
pub mod gguf_tokenizer;
pub mod safetensors;
