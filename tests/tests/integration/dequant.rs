//! GGUF dequantisation, bit for bit: against transformers' reading of the real SmolLM2 GGUF
//! (Q4_1, Q8_0) and against gguf-py for every other supported type.

use shears_core::formats::dequant::{dequantize, GgmlType};
use shears_core::formats::gguf::GgufFile;
use shears_core::formats::safetensors::SafeTensorsFile;
use shears_tests::{fixture, repo_fixture, smollm2_gguf};

fn assert_bits(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} != {w}");
    }
}

#[test]
fn smollm2_blocks_match_transformers_bit_for_bit() {
    let f = SafeTensorsFile::open(fixture("smollm2/dequant_blocks.safetensors")).unwrap();
    let g = GgufFile::open(smollm2_gguf()).unwrap();
    for (tensor, raw_name, deq_name, ty) in [
        (
            "blk.0.attn_q.weight",
            "q4_1_raw_blk0_attn_q_first4blocks",
            "q4_1_deq_blk0_attn_q_first128",
            GgmlType::Q4_1,
        ),
        (
            "token_embd.weight",
            "q8_0_raw_token_embd_first4blocks",
            "q8_0_deq_token_embd_first128",
            GgmlType::Q8_0,
        ),
    ] {
        let (_, raw) = f.read_i64(raw_name).unwrap();
        let raw: Vec<u8> = raw.iter().map(|&b| b as u8).collect();
        let info = g.tensor_info(tensor).unwrap();
        assert_eq!(info.ggml_type, ty);
        assert_eq!(
            &g.raw(info)[..raw.len()],
            &raw[..],
            "{tensor}: raw bytes at the recorded offset"
        );
        let (_, want) = f.read_f32(deq_name).unwrap();
        let got = dequantize(ty, &raw, want.len()).unwrap();
        assert_bits(deq_name, &got, &want);
    }
}

#[test]
fn every_supported_type_matches_gguf_py_bit_for_bit() {
    let f = SafeTensorsFile::open(repo_fixture("dequant_refs.safetensors")).unwrap();
    let types = [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    for ty in types {
        let name = ty.name();
        let (_, raw) = f.read_i64(&format!("{name}.raw")).unwrap();
        let raw: Vec<u8> = raw.iter().map(|&b| b as u8).collect();
        let (_, want) = f.read_f32(&format!("{name}.values")).unwrap();
        let got = dequantize(ty, &raw, want.len()).unwrap();
        assert_bits(&name, &got, &want);
    }
}

#[test]
fn f32_and_q8_k_hand_blocks() {
    let vals = [1.5f32, -2.25, 0.0, 3.0e-5];
    let raw: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_bits("F32", &dequantize(GgmlType::F32, &raw, 4).unwrap(), &vals);
    // Q8_K: f32 scale, 256 signed bytes, 16 i16 sums (ignored).
    let mut b = 0.25f32.to_le_bytes().to_vec();
    b.extend((0..256).map(|i| (i - 128) as i8 as u8));
    b.extend([0u8; 32]);
    let got = dequantize(GgmlType::Q8_K, &b, 256).unwrap();
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 0.25 * (i as f32 - 128.0));
    }
}
