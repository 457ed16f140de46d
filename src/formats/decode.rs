//! Decoding stored rows to f32: the CPU twin of `shaders/expert_matmul.wgsl`, value for
//! value as ggml's `dequantize_row_*`.
//!
//! Every product below is written in ggml's order (`(d·sc)·q`, `d1·q − m1`), and each is
//! exact in f32 except the last multiply of Q6_K and the subtraction of Q4_K, which round
//! once, the same way on every IEEE device: so the GPU decodes the same bits.

use half::f16;

use super::WeightFormat;
use crate::error::{MoeError, Result};

/// An f16 stored little-endian at `bytes[at..at + 2]`, as f32 (exact).
pub fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// ggml's doubled E2M1 values of MXFP4's nibbles (`kvalues_mxfp4`).
pub const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half of an E8M0 exponent byte's power of two, `2^(e − 128)`, exactly as ggml's
/// `ggml_e8m0_to_fp32_half` (subnormal for e < 2).
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        ((e as u32) - 1) << 23
    };
    f32::from_bits(bits)
}

/// A bf16 stored little-endian at `bytes[at..at + 2]`, as f32 (exact: its top 16 bits).
pub fn bf16_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_bits((u16::from_le_bytes([bytes[at], bytes[at + 1]]) as u32) << 16)
}

/// Q4_K's 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes (ggml's
/// `get_scale_min_k4`).
pub fn q4_k_scale_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// Q4_K: the nibble of value `v` (0..256) of a block's 128 quant bytes.
pub fn q4_k_quant(qs: &[u8], v: usize) -> u8 {
    let (chunk, within) = (v / 64, v % 64);
    let byte = qs[32 * chunk + within % 32];
    if within < 32 {
        byte & 0xF
    } else {
        byte >> 4
    }
}

/// Q6_K: the 6-bit quant (0..64) of value `v` (0..256) from the block's `ql` (128 bytes)
/// and `qh` (64 bytes).
pub fn q6_k_quant(ql: &[u8], qh: &[u8], v: usize) -> u8 {
    let (half, within) = (v / 128, v % 128);
    let (group, l) = (within / 32, within % 32);
    let low_byte = ql[64 * half + l + 32 * (group % 2)];
    let low = if group < 2 {
        low_byte & 0xF
    } else {
        low_byte >> 4
    };
    let high = (qh[32 * half + l] >> (2 * group)) & 3;
    low | (high << 4)
}

/// Decodes one stored row (`bytes`, whole blocks) into `out`.
pub fn decode_row(format: WeightFormat, bytes: &[u8], out: &mut [f32]) {
    let block_values = format.block_values();
    let blocks = bytes.chunks_exact(format.block_bytes());
    for (block, values) in blocks.zip(out.chunks_exact_mut(block_values)) {
        decode_block(format, block, values);
    }
}

fn decode_block(format: WeightFormat, block: &[u8], out: &mut [f32]) {
    match format {
        WeightFormat::F32 => {
            out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        }
        WeightFormat::F16 => out[0] = f16_at(block, 0),
        WeightFormat::Bf16 => out[0] = bf16_at(block, 0),
        WeightFormat::Q8_0 => {
            let d = f16_at(block, 0);
            for (j, value) in out.iter_mut().enumerate() {
                *value = (block[2 + j] as i8) as f32 * d;
            }
        }
        WeightFormat::Q4_0 => {
            let d = f16_at(block, 0);
            for (j, value) in out.iter_mut().enumerate() {
                let byte = block[2 + j % 16];
                let nibble = if j < 16 { byte & 0xF } else { byte >> 4 };
                *value = (nibble as i32 - 8) as f32 * d;
            }
        }
        WeightFormat::Q4K => {
            let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
            let (packed, qs) = (&block[4..16], &block[16..144]);
            for (v, value) in out.iter_mut().enumerate() {
                let (sc, m) = q4_k_scale_min(v / 32, packed);
                let d1 = d * sc as f32;
                let m1 = dmin * m as f32;
                *value = d1 * q4_k_quant(qs, v) as f32 - m1;
            }
        }
        WeightFormat::Mxfp4 => {
            let d = e8m0_half(block[0]);
            for (j, value) in out.iter_mut().enumerate() {
                let byte = block[1 + j % 16];
                let nibble = if j < 16 { byte & 0xF } else { byte >> 4 };
                *value = MXFP4_VALUES[nibble as usize] as f32 * d;
            }
        }
        WeightFormat::Q6K => {
            let (ql, qh) = (&block[0..128], &block[128..192]);
            let scales = &block[192..208];
            let d = f16_at(block, 208);
            for (v, value) in out.iter_mut().enumerate() {
                let sc = scales[v / 16] as i8;
                let q = q6_k_quant(ql, qh, v) as i32 - 32;
                *value = d * sc as f32 * q as f32;
            }
        }
    }
}

/// Checks that every value of `bytes` (whole rows of `format`) is finite: every f16/bf16
/// value, every block scale. `tensor` names them in the error.
pub fn check_finite(format: WeightFormat, bytes: &[u8], tensor: &str) -> Result<()> {
    // Offsets of the f16 scales inside a block (or the one value of f16/bf16).
    let scales: &[usize] = match format {
        WeightFormat::F32 => return Ok(()),
        // A finite power of two, but 12·2^(e − 128) overflows for e ≥ 253: decode and see.
        WeightFormat::Mxfp4 => {
            let mut values = [0.0f32; 32];
            for (index, block) in bytes.chunks_exact(format.block_bytes()).enumerate() {
                decode_block(format, block, &mut values);
                if let Some(value) = values.iter().find(|v| !v.is_finite()) {
                    return Err(MoeError::tensor(
                        tensor,
                        format!(
                            "non-finite value {value} in mxfp4 block {index} (exponent byte {})",
                            block[0]
                        ),
                    ));
                }
            }
            return Ok(());
        }
        WeightFormat::F16 | WeightFormat::Bf16 | WeightFormat::Q8_0 | WeightFormat::Q4_0 => &[0],
        WeightFormat::Q4K => &[0, 2],
        WeightFormat::Q6K => &[208],
    };
    for (index, block) in bytes.chunks_exact(format.block_bytes()).enumerate() {
        for &at in scales {
            let value = match format {
                WeightFormat::Bf16 => bf16_at(block, at),
                _ => f16_at(block, at),
            };
            if !value.is_finite() {
                let what = if format.is_quantized() {
                    format!("non-finite scale {value} in {format} block {index}")
                } else {
                    format!("non-finite value {value} at flat index {index}")
                };
                return Err(MoeError::tensor(tensor, what));
            }
        }
    }
    Ok(())
}
