//! Encoding f32 rows into a stored format, as ggml does: f16 and bf16 round to nearest
//! even; Q8_0, Q4_0, Q4_K, Q6_K and MXFP4 follow ggml's reference quantizers
//! (`quantize_row_*_ref`, the ones llama.cpp uses without an importance matrix),
//! operation for operation in f32 so that the same input gives the same blocks.

use half::f16;

use super::decode::{e8m0_half, q4_k_scale_min, MXFP4_VALUES};
use super::WeightFormat;

/// ggml's `nearest_int`: round to nearest, ties to even, through the f32 adder (valid for
/// |value| ≤ 2²² − 1, which every caller's range is).
fn nearest_int(value: f32) -> i32 {
    let shifted = value + 12_582_912.0;
    (shifted.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn push_f16(out: &mut Vec<u8>, value: f32) {
    out.extend_from_slice(&f16::from_f32(value).to_le_bytes());
}

/// ggml's f32 → bf16: round to nearest even (NaN kept quiet; our inputs are finite).
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    ((bits + (0x7fff + ((bits >> 16) & 1))) >> 16) as u16
}

/// Appends `row` (a whole number of `format`'s blocks) encoded in `format` to `out`.
pub fn encode_row(format: WeightFormat, row: &[f32], out: &mut Vec<u8>) {
    match format {
        WeightFormat::F32 => row
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        WeightFormat::F16 => row.iter().for_each(|&v| push_f16(out, v)),
        WeightFormat::Bf16 => row
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16_bits(v).to_le_bytes())),
        WeightFormat::Q8_0 => row.chunks_exact(32).for_each(|b| q8_0_block(b, out)),
        WeightFormat::Q4_0 => row.chunks_exact(32).for_each(|b| q4_0_block(b, out)),
        WeightFormat::Q4K => row.chunks_exact(256).for_each(|b| q4_k_block(b, out)),
        WeightFormat::Q6K => row.chunks_exact(256).for_each(|b| q6_k_block(b, out)),
        WeightFormat::Mxfp4 => row.chunks_exact(32).for_each(|b| mxfp4_block(b, out)),
    }
}

/// MXFP4 as ggml (and gguf-py) quantize it: `e = floor(log2(amax)) − 2 + 127` (0 for an
/// all-zero block), then each value's nearest of `kv·2^(e − 128)`, the first of equals.
fn mxfp4_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let e = if amax > 0.0 {
        (amax.log2().floor() - 2.0 + 127.0).clamp(0.0, 255.0) as u8
    } else {
        0
    };
    let d = e8m0_half(e);
    let nearest = |v: f32| {
        let mut best = (0u8, f32::INFINITY);
        for (q, &kv) in MXFP4_VALUES.iter().enumerate() {
            let error = (d * kv as f32 - v).abs();
            if error < best.1 {
                best = (q as u8, error);
            }
        }
        best.0
    };
    out.push(e);
    out.extend((0..16).map(|j| nearest(x[j]) | (nearest(x[j + 16]) << 4)));
}

fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    // The value of largest magnitude, the first one on ties.
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let quant = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    out.extend((0..16).map(|j| quant(x[j]) | (quant(x[j + 16]) << 4)));
}

/// ggml's `make_qkx2_quants`: scale and min (returned as `-min`) of one sub-block of
/// `x` with levels 0..=nmax in `levels`, searching `nstep + 1` scales around the range.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let level = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax);
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        levels[i] = level(iscale, x[i], min) as u8;
        let diff = scale * levels[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = level(iscale, x[i], min);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                error += weights[i] * (diff * diff);
            }
            if error < best_error {
                levels[..n].copy_from_slice(&aux[..n]);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

fn q4_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0u8; 256];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let sub = &x[32 * j..32 * (j + 1)];
        let sum_x2 = sub.iter().fold(0.0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: Vec<f32> = sub.iter().map(|v| av_x + v.abs()).collect();
        let levels = &mut levels[32 * j..32 * (j + 1)];
        (scales[j], mins[j]) = make_qkx2_quants(15, sub, &weights, levels, -1.0, 0.1, 20);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = q4_k_scale_min(j, &packed);
        let d = d.to_f32() * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 32 * j..32 * (j + 1) {
            levels[i] = nearest_int((x[i] + dm) / d).clamp(0, 15) as u8;
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    for chunk in levels.chunks_exact(64) {
        out.extend((0..32).map(|l| chunk[l] | (chunk[l + 32] << 4)));
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights: a signed scale
/// for levels −nmax..nmax−1 (stored offset by nmax in `levels`), searched around
/// `−nmax / max` for the least x²-weighted error.
fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        x.iter().fold((0.0f32, 0.0f32), |(sumlx, suml2), &v| {
            let (w, l) = (v * v, level(iscale, v) as f32);
            (sumlx + w * v * l, suml2 + w * l * l)
        })
    };
    let mut iscale = -(nmax as f32) / max;
    for (out, &v) in levels.iter_mut().zip(x) {
        *out = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|&s| s != 0) {
        iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (out, &v) in levels.iter_mut().zip(x) {
                *out = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0i8; 256];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    let groups = x.chunks_exact(16).zip(levels.chunks_exact_mut(16));
    for (scale, (group, group_levels)) in scales.iter_mut().zip(groups) {
        *scale = make_qx_quants(32, group, group_levels);
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = *scale;
        }
    }
    if max_abs_scale < 1e-15 {
        out.extend_from_slice(&[0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let block_scales: Vec<i8> = scales
        .iter()
        .map(|&s| nearest_int(iscale * s).min(127) as i8)
        .collect();
    for (j, &sc) in block_scales.iter().enumerate() {
        let d = d.to_f32() * sc as f32;
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * (j + 1) {
            levels[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    let level = |i: usize| levels[i] as u8;
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for half in 0..2 {
        let j = 128 * half;
        for l in 0..32 {
            ql[64 * half + l] = (level(j + l) & 0xF) | ((level(j + l + 64) & 0xF) << 4);
            ql[64 * half + l + 32] = (level(j + l + 32) & 0xF) | ((level(j + l + 96) & 0xF) << 4);
            qh[32 * half + l] = (level(j + l) >> 4)
                | ((level(j + l + 32) >> 4) << 2)
                | ((level(j + l + 64) >> 4) << 4)
                | ((level(j + l + 96) >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(block_scales.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::decode::decode_row;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 2.49, -7.51].map(nearest_int),
            [0, 2, 2, 0, -2, 2, -8]
        );
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
    }

    /// Quantizing then decoding stays within half a quantization step of each value (the
    /// step is the block's scale; Q8_0: amax/127) or, for Q4_0, one step: its levels run
    /// from −8 steps (the value of largest magnitude) to +7, so values beyond +7.5 steps on
    /// the other side clamp to +7 (amax/8 at most).
    #[test]
    fn round_trips_within_a_step() {
        let row: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for (format, step_of_amax) in [
            (WeightFormat::Q8_0, 0.5 / 127.0),
            (WeightFormat::Q4_0, 1.0 / 8.0),
        ] {
            let mut bytes = Vec::new();
            encode_row(format, &row, &mut bytes);
            assert_eq!(bytes.len(), 512 / 32 * format.block_bytes());
            let mut decoded = vec![0.0; 512];
            decode_row(format, &bytes, &mut decoded);
            for (block, values) in row.chunks(32).zip(decoded.chunks(32)) {
                let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                for (x, y) in block.iter().zip(values) {
                    // Plus the f16 rounding of the scale (2^-11 relative, times ≤ 8 levels).
                    let bound = step_of_amax * amax + amax / 256.0;
                    assert!((x - y).abs() <= bound, "{format}: {x} vs {y}");
                }
            }
        }
    }

    /// The K-quants of a row in [−1, 1] come back within one level's step: Q4_K spreads a
    /// sub-block's range (at most 2) over 15 levels, Q6_K ±max (at most 1) over 32 each way.
    #[test]
    fn k_quants_round_trip_within_a_step() {
        let row: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
        for (format, tolerance) in [
            (WeightFormat::Q4K, 2.0 / 15.0),
            (WeightFormat::Q6K, 1.0 / 32.0),
        ] {
            let mut bytes = Vec::new();
            encode_row(format, &row, &mut bytes);
            assert_eq!(bytes.len(), 2 * format.block_bytes());
            let mut decoded = vec![0.0; 512];
            decode_row(format, &bytes, &mut decoded);
            let worst = row
                .iter()
                .zip(&decoded)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < tolerance, "{format}: worst error {worst}");
        }
        // All zeros stay zeros.
        for format in [WeightFormat::Q4K, WeightFormat::Q6K] {
            let mut bytes = Vec::new();
            encode_row(format, &[0.0; 256], &mut bytes);
            let mut decoded = vec![1.0; 256];
            decode_row(format, &bytes, &mut decoded);
            assert!(decoded.iter().all(|&v| v == 0.0), "{format}");
        }
    }
}
