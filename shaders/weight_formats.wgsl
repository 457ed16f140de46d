// weight_formats: expert weights decoded from their stored format inside the matmuls'
// operand loads. The shader registry prepends this file to expert_up and expert_down, so
// both read every format through the one `weight_quad` below; its CPU twin is
// src/formats/decode.rs, value for value (products in ggml's order, so the same bits).
//
// A weight tensor is three u32 texture arrays, one layer per expert, row quads along y
// (quad q holds rows 4q .. 4q + 4; component j of a texel is row 4q + j):
// - quants: f32 (rgba32uint bits), f16, bf16 (rgba16uint): texel (4·k4 + j, q) holds row
//   4q + j at k = 4·k4 .. 4·k4 + 4, as the f32 layout always did. Q8_0 (rgba32uint): texel
//   (k4, q), component j the four i8 of row 4q + j at k = 4·k4 + i in byte i. Q4_0, Q4_K
//   and Q6_K (rgba16uint): texel (k4, q), component j the four nibbles (Q6_K: the low four
//   bits) of row 4q + j, value i in bits 4i .. 4i + 4.
// - high (Q6_K only, r32uint): texel (k4, q), bits 8j + 2i the top two bits of row 4q + j's
//   value i. A 1-texel dummy for the other formats.
// - scales: Q8_0 and Q4_0 (rgba16uint): texel (k / 32, q), the f16 bits of each row's
//   block scale. Q4_K (rgba32uint): five texels per 256-value super-block s: 5s holds
//   d | dmin << 16 (f16 bits), 5s + 1 + p sub-blocks 2p and 2p + 1 as (sc | m << 8), the
//   second in the high half. Q6_K (rgba32uint): 5s holds d (f16 bits), 5s + 1 + p the i8
//   scales of the 16-value groups 4p .. 4p + 4, one per byte. A dummy for the rest.
// Scales are finite (checked at load); f16 is decoded with integer ops, exactly, also where
// a GPU's unpack2x16float would flush subnormals.

// Formats are codes in WeightFormat's order: 0 f32, 1 f16, 2 bf16, 3 Q8_0, 4 Q4_0, 5 Q4_K,
// 6 Q6_K. The kernels pass their weights' codes from overrides, so after specialisation the
// switch below is on a constant and compiles to one branch.

// An f16 (the low 16 bits of `bits`) as f32, exactly.
fn half_to_f32(bits: u32) -> f32 {
    let sign = (bits & 0x8000u) << 16u;
    let exponent = (bits >> 10u) & 0x1fu;
    let mantissa = bits & 0x3ffu;
    // Subnormals (and zero) are mantissa · 2^-24, a normal f32.
    let subnormal = bitcast<u32>(ldexp(f32(mantissa), -24));
    let normal = ((exponent + 112u) << 23u) | (mantissa << 13u);
    return bitcast<f32>(sign | select(normal, subnormal, exponent == 0u));
}

fn half4_to_f32(bits: vec4<u32>) -> vec4<f32> {
    return vec4(half_to_f32(bits.x), half_to_f32(bits.y), half_to_f32(bits.z), half_to_f32(bits.w));
}

// The four nibbles of `packed` (value i in bits 4i ..), as unsigned integers.
fn nibbles(packed: u32) -> vec4<u32> {
    return (vec4(packed) >> vec4(0u, 4u, 8u, 12u)) & vec4(15u);
}

// The four bytes of `packed` as i8 (byte i = value i): each shifted to the top, then
// arithmetically back down.
fn signed_bytes(packed: u32) -> vec4<i32> {
    return bitcast<vec4<i32>>(vec4(packed) << vec4(24u, 16u, 8u, 0u)) >> vec4(24u);
}

// Q8_0: row j's four i8 (`packed`, byte i = value i) times its block scale.
fn q8_0_values(packed: u32, scale_bits: u32) -> vec4<f32> {
    return vec4<f32>(signed_bytes(packed)) * half_to_f32(scale_bits);
}

// Q4_0: (nibble − 8) · d.
fn q4_0_values(packed: u32, scale_bits: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>(nibbles(packed)) - vec4(8)) * half_to_f32(scale_bits);
}

// Q4_K: (d·sc)·q − dmin·m, with `pair` the sub-block's (sc | m << 8) in its low 16 bits.
fn q4_k_values(packed: u32, super_bits: u32, pair: u32) -> vec4<f32> {
    let scale = half_to_f32(super_bits & 0xffffu) * f32(pair & 0xffu);
    let offset = half_to_f32(super_bits >> 16u) * f32((pair >> 8u) & 0xffu);
    return scale * vec4<f32>(nibbles(packed)) - offset;
}

// Q6_K: (d·sc)·(q − 32) with q = low nibble | high two bits << 4; `high` holds the four
// values' top bits in its low byte, `scale` the group's i8 in its low byte.
fn q6_k_values(packed: u32, high: u32, d_bits: u32, scale: u32) -> vec4<f32> {
    let top = (vec4(high) >> vec4(0u, 2u, 4u, 6u)) & vec4(3u);
    let q = vec4<i32>(nibbles(packed) | (top << vec4(4u))) - vec4(32);
    let group_scale = half_to_f32(d_bits) * f32(signed_bytes(scale).x);
    return group_scale * vec4<f32>(q);
}

// Weight rows 4·quad .. 4·quad + 4 of expert layer `layer` at k = 4·k4 .. 4·k4 + 4, stored in
// `format`: column j of the result is row 4·quad + j.
fn weight_quad(
    format: u32, quants: texture_2d_array<u32>, high: texture_2d_array<u32>,
    scales: texture_2d_array<u32>, quad: u32, layer: u32, k4: u32,
) -> mat4x4<f32> {
    switch format {
        case 1u: {
            return mat4x4(half4_to_f32(textureLoad(quants, vec2(4u * k4, quad), layer, 0)),
                half4_to_f32(textureLoad(quants, vec2(4u * k4 + 1u, quad), layer, 0)),
                half4_to_f32(textureLoad(quants, vec2(4u * k4 + 2u, quad), layer, 0)),
                half4_to_f32(textureLoad(quants, vec2(4u * k4 + 3u, quad), layer, 0)));
        }
        case 2u: {
            // bf16 is the top half of an f32.
            return mat4x4(bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4, quad), layer, 0) << vec4(16u)),
                bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4 + 1u, quad), layer, 0) << vec4(16u)),
                bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4 + 2u, quad), layer, 0) << vec4(16u)),
                bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4 + 3u, quad), layer, 0) << vec4(16u)));
        }
        case 3u: {
            let q = textureLoad(quants, vec2(k4, quad), layer, 0);
            let d = textureLoad(scales, vec2(k4 / 8u, quad), layer, 0);
            return mat4x4(q8_0_values(q.x, d.x), q8_0_values(q.y, d.y), q8_0_values(q.z, d.z),
                q8_0_values(q.w, d.w));
        }
        case 4u: {
            let q = textureLoad(quants, vec2(k4, quad), layer, 0);
            let d = textureLoad(scales, vec2(k4 / 8u, quad), layer, 0);
            return mat4x4(q4_0_values(q.x, d.x), q4_0_values(q.y, d.y), q4_0_values(q.z, d.z),
                q4_0_values(q.w, d.w));
        }
        case 5u: {
            let q = textureLoad(quants, vec2(k4, quad), layer, 0);
            let super_block = 5u * (k4 / 64u);
            let sub_block = (k4 / 8u) % 8u;
            let d = textureLoad(scales, vec2(super_block, quad), layer, 0);
            let pairs = textureLoad(scales, vec2(super_block + 1u + sub_block / 2u, quad), layer, 0)
                >> vec4(16u * (sub_block % 2u));
            return mat4x4(q4_k_values(q.x, d.x, pairs.x), q4_k_values(q.y, d.y, pairs.y),
                q4_k_values(q.z, d.z, pairs.z), q4_k_values(q.w, d.w, pairs.w));
        }
        case 6u: {
            let q = textureLoad(quants, vec2(k4, quad), layer, 0);
            let top = vec4(textureLoad(high, vec2(k4, quad), layer, 0).x) >> vec4(0u, 8u, 16u, 24u);
            let super_block = 5u * (k4 / 64u);
            let group = (k4 / 4u) % 16u;
            let d = textureLoad(scales, vec2(super_block, quad), layer, 0);
            let group_scales = textureLoad(scales, vec2(super_block + 1u + group / 4u, quad), layer, 0)
                >> vec4(8u * (group % 4u));
            return mat4x4(q6_k_values(q.x, top.x, d.x, group_scales.x),
                q6_k_values(q.y, top.y, d.y, group_scales.y),
                q6_k_values(q.z, top.z, d.z, group_scales.z),
                q6_k_values(q.w, top.w, d.w, group_scales.w));
        }
        default: {
            return mat4x4(bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4, quad), layer, 0)),
                bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4 + 1u, quad), layer, 0)),
                bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4 + 2u, quad), layer, 0)),
                bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4 + 3u, quad), layer, 0)));
        }
    }
}
