//! f32 rows to the ggml storage types Shears writes (F32, F16, BF16, Q8_0, Q4_0, Q4_1), with
//! llama.cpp's reference rounding (`quantize_row_*_ref` in ggml-quants.c) so a file written
//! here holds the bytes llama.cpp's own converter would write for the same weights.

use half::{bf16, f16};

use super::dequant::GgmlType;

/// Elements per block of the block-quantised types.
pub const QK: usize = 32;

/// Whether `ty` is one Shears can write.
pub fn can_write(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
    )
}

/// Bytes `numel` elements take in `ty` (`numel` a multiple of the block size).
pub fn encoded_len(ty: GgmlType, numel: usize) -> usize {
    let (block, bytes) = ty.block();
    numel / block * bytes
}

/// Encode `x` (whole rows, so a multiple of the block size for the quantised types) as `ty`,
/// appending to `out`. Panics on a type [`can_write`] refuses or a partial block: callers
/// check both first.
pub fn encode(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    out.reserve(encoded_len(ty, x.len()));
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x
            .iter()
            .for_each(|&v| out.extend(f16::from_f32(v).to_le_bytes())),
        GgmlType::BF16 => x
            .iter()
            .for_each(|&v| out.extend(bf16::from_f32(v).to_le_bytes())),
        GgmlType::Q8_0 => blocks(x).for_each(|b| q8_0(b, out)),
        GgmlType::Q4_0 => blocks(x).for_each(|b| q4_0(b, out)),
        GgmlType::Q4_1 => blocks(x).for_each(|b| q4_1(b, out)),
        other => panic!("cannot encode ggml type {}", other.name()),
    }
}

fn blocks(x: &[f32]) -> std::slice::ChunksExact<'_, f32> {
    assert!(x.len().is_multiple_of(QK), "partial quantisation block");
    x.chunks_exact(QK)
}

fn push_f16(v: f32, out: &mut Vec<u8>) {
    out.extend(f16::from_f32(v).to_le_bytes());
}

/// `quantize_row_q8_0_ref`: d = max|x| / 127, q = round(x / d) (half away from zero).
fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(d, out);
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// `quantize_row_q4_0_ref`: d = (the value of largest magnitude, signed) / -8; nibbles
/// min(15, trunc(x / d + 8.5)); element j in the low nibble of byte j, j + 16 in the high one.
fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(d, out);
    let nib = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    out.extend((0..QK / 2).map(|j| nib(x[j]) | (nib(x[j + QK / 2]) << 4)));
}

/// `quantize_row_q4_1_ref`: d = (max - min) / 15, m = min; nibbles min(15, trunc((x - m) / d + 0.5)).
fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(d, out);
    push_f16(min, out);
    let nib = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    out.extend((0..QK / 2).map(|j| nib(x[j]) | (nib(x[j + QK / 2]) << 4)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::dequant::dequantize;

    fn block(f: impl Fn(usize) -> f32) -> Vec<f32> {
        (0..QK).map(f).collect()
    }

    #[test]
    fn q8_0_hand_block() {
        // max |x| = 2.54, so d = 0.02 and x = 0.02 * q exactly for these q.
        let x = block(|i| (i as f32 - 16.0) * 0.02 * 7.9375);
        let mut out = vec![];
        encode(GgmlType::Q8_0, &x, &mut out);
        assert_eq!(out.len(), 34);
        let d = f16::from_le_bytes([out[0], out[1]]).to_f32();
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(d, f16::from_f32(amax / 127.0).to_f32());
        for (i, &q) in out[2..].iter().enumerate() {
            assert_eq!(
                q as i8,
                (x[i] * (127.0 / amax)).round() as i8,
                "element {i}"
            );
        }
        assert_eq!(out[2] as i8, -127);
    }

    #[test]
    fn q4_0_hand_block() {
        // Largest magnitude -4.0 (negative): d = 0.5, nibble = trunc(x / 0.5 + 8.5).
        let mut x = block(|i| (i % 8) as f32 * 0.5 - 1.75);
        x[5] = -4.0;
        let mut out = vec![];
        encode(GgmlType::Q4_0, &x, &mut out);
        assert_eq!(out.len(), 18);
        assert_eq!(f16::from_le_bytes([out[0], out[1]]).to_f32(), 0.5);
        let nib = |v: f32| ((v / 0.5 + 8.5) as i8).min(15) as u8;
        for j in 0..16 {
            assert_eq!(out[2 + j] & 15, nib(x[j]), "low {j}");
            assert_eq!(out[2 + j] >> 4, nib(x[j + 16]), "high {j}");
        }
        // -4.0 maps to trunc(-8 + 8.5) = 0; +3.5 (the top of the range) to 15.
        assert_eq!(out[2 + 5] & 15, 0);
    }

    #[test]
    fn q4_1_hand_block() {
        let x = block(|i| 1.0 + i as f32 * 0.25);
        let mut out = vec![];
        encode(GgmlType::Q4_1, &x, &mut out);
        assert_eq!(out.len(), 20);
        let d = f16::from_le_bytes([out[0], out[1]]).to_f32();
        let m = f16::from_le_bytes([out[2], out[3]]).to_f32();
        assert_eq!(m, 1.0);
        assert_eq!(d, f16::from_f32(7.75 / 15.0).to_f32());
        assert_eq!(out[4] & 15, 0);
        assert_eq!(out[4 + 15] >> 4, 15);
    }

    #[test]
    fn zero_blocks_encode_as_zero() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let mut out = vec![];
            encode(ty, &[0.0; QK], &mut out);
            assert_eq!(dequantize(ty, &out, QK).unwrap(), vec![0.0; QK]);
        }
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x: Vec<f32> = (0..QK * 8)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        for (ty, steps) in [
            (GgmlType::Q8_0, 127.0),
            (GgmlType::Q4_0, 8.0),
            (GgmlType::Q4_1, 15.0),
        ] {
            let mut out = vec![];
            encode(ty, &x, &mut out);
            assert_eq!(out.len(), encoded_len(ty, x.len()));
            let y = dequantize(ty, &out, x.len()).unwrap();
            for (b, (xb, yb)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
                let lo = xb.iter().cloned().fold(f32::MAX, f32::min);
                let hi = xb.iter().cloned().fold(f32::MIN, f32::max);
                let amax = lo.abs().max(hi.abs());
                let step = if ty == GgmlType::Q4_1 {
                    (hi - lo) / steps
                } else {
                    amax / steps
                };
                for (a, b2) in xb.iter().zip(yb) {
                    // Half a step, plus the f16 rounding of the scale (and Q4_0's one-sided clamp).
                    let tol = if ty == GgmlType::Q4_0 {
                        step
                    } else {
                        step * 0.5
                    };
                    assert!(
                        (a - b2).abs() <= tol * 1.01 + 1e-3 * amax,
                        "{} block {b}: {a} vs {b2}",
                        ty.name()
                    );
                }
            }
        }
    }

    #[test]
    fn float_types_round_trip() {
        let x = vec![1.0f32, -2.5, std::f32::consts::PI, 65504.0, 1e-8];
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let mut out = vec![];
            encode(ty, &x, &mut out);
            let y = dequantize(ty, &out, x.len()).unwrap();
            if ty == GgmlType::F32 {
                assert_eq!(x, y);
            } else {
                for (a, b) in x.iter().zip(&y) {
                    assert!((a - b).abs() <= a.abs() * 8e-3 + 1e-7, "{}", ty.name());
                }
            }
        }
    }
}
