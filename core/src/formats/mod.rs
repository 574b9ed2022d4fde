//! File formats, each in one place: safetensors, Arrow IPC (benchmark sets), GGUF (reading with ggml dequantisation,
//! writing with ggml quantisation), and the GGUF LLaMA and tokenizer conversions both ways.

pub mod arrow;
pub mod dequant;
pub mod gguf;
pub mod gguf_llama;
pub mod gguf_tokenizer;
pub mod gguf_vocab;
pub mod gguf_write;
pub mod quantize;
pub mod safetensors;
