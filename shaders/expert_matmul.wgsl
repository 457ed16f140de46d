// expert_matmul: what expert_up and expert_down share (WGSL has no includes: the shader
// registry prepends this file to both, and naga validates each combination): the
// register-block accumulate of their K loops, and the weights decoded from their stored
// format inside the operand loads, every format through the one `weight_quad` below. Its
// CPU twin is src/formats/decode.rs, value for value (products in ggml's order, so the
// same bits).
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
// 6 Q6_K, 7 MXFP4 (quants laid out as Q4_0's; scales: rgba16uint texel (k / 64, q), each
// row's E8M0 exponent bytes of blocks 2b and 2b + 1 in its low and high byte). The kernels pass their weights' codes from overrides, so after specialisation the
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

// A row quad's scales over the 32 values from k = 32·(k4 / 8): what weight_quad needs
// besides the quants, decoded once per 32 values rather than at every k4. Per row (one
// component each): `first` is Q8_0's and Q4_0's block scale d, Q4_K's d·sc, Q6_K's d·sc of
// the first 16 values; `second` is Q4_K's dmin·m, Q6_K's d·sc of the next 16. Each product
// of an f16 and a small integer is exact, as in ggml, which forms them the same way.
struct QuadScales {
    first: vec4<f32>,
    second: vec4<f32>,
}

// Whether either format has block scales (the quantized ones): with the kernels' format
// overrides this is a constant, so f32, f16 and bf16 loops carry no scale loads.
fn has_block_scales(format: u32, other: u32) -> bool {
    return format >= 3u || other >= 3u;
}

// The bytes `byte` of the four components of `packed`, as i8.
fn signed_byte4(packed: vec4<u32>, byte: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(packed << vec4(24u - 8u * byte)) >> vec4(24u));
}

// The scales of row quad `quad` of expert layer `layer` for the 32 values holding k4
// (see QuadScales); zeros for formats without scales.
fn quad_scales(format: u32, scales: texture_2d_array<u32>, quad: u32, layer: u32, k4: u32) -> QuadScales {
    switch format {
        case 3u, 4u: {
            let d = textureLoad(scales, vec2(k4 / 8u, quad), layer, 0);
            return QuadScales(half4_to_f32(d), vec4(0.0));
        }
        case 5u: {
            let super_block = 5u * (k4 / 64u);
            let sub_block = (k4 / 8u) % 8u;
            let d = textureLoad(scales, vec2(super_block, quad), layer, 0);
            let pairs = textureLoad(scales, vec2(super_block + 1u + sub_block / 2u, quad), layer, 0)
                >> vec4(16u * (sub_block % 2u));
            return QuadScales(half4_to_f32(d & vec4(0xffffu)) * vec4<f32>(pairs & vec4(0xffu)),
                half4_to_f32(d >> vec4(16u)) * vec4<f32>((pairs >> vec4(8u)) & vec4(0xffu)));
        }
        case 7u: {
            // MXFP4: 2^(e − 128), exact for e ≥ 2 (e < 2 is subnormal, which a GPU may flush).
            let pair = textureLoad(scales, vec2(k4 / 16u, quad), layer, 0);
            let e = (pair >> vec4(8u * ((k4 / 8u) % 2u))) & vec4(0xffu);
            return QuadScales(ldexp(vec4(1.0), vec4<i32>(e) - vec4(128)), vec4(0.0));
        }
        case 6u: {
            // The 32 values hold groups 2s and 2s + 1: bytes 2s % 4 and its next of a texel.
            let super_block = 5u * (k4 / 64u);
            let group = (k4 / 4u) % 16u;
            let d = half4_to_f32(textureLoad(scales, vec2(super_block, quad), layer, 0));
            let group_scales = textureLoad(scales, vec2(super_block + 1u + group / 4u, quad), layer, 0);
            return QuadScales(d * signed_byte4(group_scales, group % 4u),
                d * signed_byte4(group_scales, group % 4u + 1u));
        }
        default: {
            return QuadScales(vec4(0.0), vec4(0.0));
        }
    }
}

// Weight rows 4·quad .. 4·quad + 4 of expert layer `layer` at k = 4·k4 .. 4·k4 + 4, stored in
// `format`, with the quad's `scales` for these k (quad_scales): column j of the result is
// row 4·quad + j.
fn weight_quad(
    format: u32, quants: texture_2d_array<u32>, high: texture_2d_array<u32>, scales: QuadScales,
    quad: u32, layer: u32, k4: u32,
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
            // Q8_0: q·d.
            let q = textureLoad(quants, vec2(k4, quad), layer, 0);
            let d = scales.first;
            return mat4x4(vec4<f32>(signed_bytes(q.x)) * d.x, vec4<f32>(signed_bytes(q.y)) * d.y,
                vec4<f32>(signed_bytes(q.z)) * d.z, vec4<f32>(signed_bytes(q.w)) * d.w);
        }
        case 4u: {
            // Q4_0: (q − 8)·d.
            let q = textureLoad(quants, vec2(k4, quad), layer, 0);
            let d = scales.first;
            return mat4x4(vec4<f32>(vec4<i32>(nibbles(q.x)) - vec4(8)) * d.x,
                vec4<f32>(vec4<i32>(nibbles(q.y)) - vec4(8)) * d.y,
                vec4<f32>(vec4<i32>(nibbles(q.z)) - vec4(8)) * d.z,
                vec4<f32>(vec4<i32>(nibbles(q.w)) - vec4(8)) * d.w);
        }
        case 5u: {
            // Q4_K: (d·sc)·q − dmin·m; d·sc·q is exact, so one rounding (fused or not).
            let q = textureLoad(quants, vec2(k4, quad), layer, 0);
            let scale = scales.first;
            let offset = scales.second;
            return mat4x4(scale.x * vec4<f32>(nibbles(q.x)) - offset.x,
                scale.y * vec4<f32>(nibbles(q.y)) - offset.y,
                scale.z * vec4<f32>(nibbles(q.z)) - offset.z,
                scale.w * vec4<f32>(nibbles(q.w)) - offset.w);
        }
        case 7u: {
            // MXFP4: kv[q]·2^(e − 128); every product exact.
            let q = textureLoad(quants, vec2(k4, quad), layer, 0);
            let d = scales.first;
            return mat4x4(e2m1_doubled(nibbles(q.x)) * d.x, e2m1_doubled(nibbles(q.y)) * d.y,
                e2m1_doubled(nibbles(q.z)) * d.z, e2m1_doubled(nibbles(q.w)) * d.w);
        }
        case 6u: {
            // Q6_K: (d·sc)·(q − 32), q = low nibble | high two bits << 4.
            let q = textureLoad(quants, vec2(k4, quad), layer, 0);
            let top = vec4(textureLoad(high, vec2(k4, quad), layer, 0).x) >> vec4(0u, 8u, 16u, 24u);
            let scale = select(scales.first, scales.second, k4 % 8u >= 4u);
            return mat4x4(q6_k_values(q.x, top.x) * scale.x, q6_k_values(q.y, top.y) * scale.y,
                q6_k_values(q.z, top.z) * scale.z, q6_k_values(q.w, top.w) * scale.w);
        }
        default: {
            return mat4x4(bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4, quad), layer, 0)),
                bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4 + 1u, quad), layer, 0)),
                bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4 + 2u, quad), layer, 0)),
                bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * k4 + 3u, quad), layer, 0)));
        }
    }
}

// MXFP4: ggml's doubled E2M1 values of four nibbles: 0, 1, 2, 3, 4, 6, 8, 12 for magnitude
// codes m = 0 .. 7 (m < 2: m; else 2^(m / 2)·(1 + (m % 2) / 2)), negative for bit 3.
fn e2m1_doubled(q: vec4<u32>) -> vec4<f32> {
    let m = q & vec4(7u);
    // ldexp is exact where exp2 need not be.
    let large = ldexp(vec4(1.0) + 0.5 * vec4<f32>(m & vec4(1u)), vec4<i32>(m >> vec4(1u)));
    let magnitude = select(large, vec4<f32>(m), m < vec4(2u));
    // Code 8 is +0, as the table has it.
    return select(magnitude, -magnitude, ((q & vec4(8u)) != vec4(0u)) & (m != vec4(0u)));
}

// Q6_K: a row's four values q − 32 (low nibbles in `packed`, top two bits in the low byte
// of `high`).
fn q6_k_values(packed: u32, high: u32) -> vec4<f32> {
    let top = (vec4(high) >> vec4(0u, 2u, 4u, 6u)) & vec4(3u);
    return vec4<f32>(vec4<i32>(nibbles(packed) | (top << vec4(4u))) - vec4(32));
}

// One row quad of the block: acc_j += a·w_j (a: four rows of the left operand, transposed),
// so that acc_j[c][r] = (row r, column 4j + c); the kernels' QUADS says how many of the
// four column quads the block has.
fn accumulate(
    acc0: ptr<function, mat4x4<f32>>, acc1: ptr<function, mat4x4<f32>>,
    acc2: ptr<function, mat4x4<f32>>, acc3: ptr<function, mat4x4<f32>>,
    a: mat4x4<f32>, w0: mat4x4<f32>, w1: mat4x4<f32>, w2: mat4x4<f32>, w3: mat4x4<f32>,
) {
    *acc0 += a * w0;
    *acc1 += a * w1;
    if (QUADS == 4u) {
        *acc2 += a * w2;
        *acc3 += a * w3;
    }
}
