// expert_up: the up-projection of every expert in ONE dispatch (a grouped matmul).
// H[slot, f] = act(x[slot_token[slot]]·W1[e, f] + b1[e, f])
//              (⊙ (x[slot_token[slot]]·W3[e, f] + b3[e, f]) when GATED)
// for every kept slot, where e is the expert owning the slot's row tile.
//
// Dispatch (indirect, arguments from scan_expert_offsets): x = column tiles of F,
// y = the row tiles of this weight shard's experts. A workgroup of 64 invocations is laid
// out ROW_LANES × (64 / ROW_LANES); each invocation keeps an 8×8 output block in
// registers, so a tile is 8·ROW_LANES rows by 512 / ROW_LANES columns. The host picks
// ROW_LANES from the tokens per expert, so that small experts waste few padded rows.
// The row gather x[slot_token[...]] happens in the operand loads: no permuted copy of x.
// Bindings: 0 params, 1 x [T, D], 2 slot_token [slots], 3 expert_table,
// 4 w1 [shard experts, F, D], 5 w3 [shard experts, F, D] (a dummy unless GATED),
// 6 up_bias [shard experts, F] b1, then [shard experts, F] b3 when GATED, 7 hidden [slots, F].

struct ExpertParams {
    d_model: u32,
    d_ff: u32,
    num_experts: u32,
    shard_first_expert: u32,
    shard_num_experts: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Activation codes: 0 relu, 1 gelu (erf), 2 gelu_tanh, 3 silu.
override ACTIVATION: u32 = 0u;
override GATED: bool = false;
// Lanes along the rows of a tile: 1, 2, 4 or 8.
override ROW_LANES: u32 = 2u;

const LANES: u32 = 64u;
const BLOCK: u32 = 8u;

@group(0) @binding(0) var<uniform> params: ExpertParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var<storage, read> w1: array<f32>;
@group(0) @binding(5) var<storage, read> w3: array<f32>;
@group(0) @binding(6) var<storage, read> up_bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> hidden: array<f32>;

// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, below f32 resolution of 1 + erf).
fn erf_approx(v: f32) -> f32 {
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
        + t * (-1.453152027 + t * 1.061405429))));
    return sign(v) * (1.0 - poly * exp(-a * a));
}

fn activate(a: f32) -> f32 {
    switch ACTIVATION {
        case 1u: {
            return 0.5 * a * (1.0 + erf_approx(a * 0.70710678));
        }
        case 2u: {
            // tanh saturates to ±1 in f32 beyond |u| = 9; the clamp keeps exp-based
            // tanh implementations from producing inf/inf.
            let u = clamp(0.7978845608 * (a + 0.044715 * a * a * a), -9.0, 9.0);
            return 0.5 * a * (1.0 + tanh(u));
        }
        case 3u: {
            return a / (1.0 + exp(-a));
        }
        default: {
            return max(a, 0.0);
        }
    }
}

fn x4(at: u32) -> vec4<f32> {
    return vec4(x[at], x[at + 1u], x[at + 2u], x[at + 3u]);
}

fn w1_4(at: u32) -> vec4<f32> {
    return vec4(w1[at], w1[at + 1u], w1[at + 2u], w1[at + 3u]);
}

fn w3_4(at: u32) -> vec4<f32> {
    return vec4(w3[at], w3[at + 1u], w3[at + 2u], w3[at + 3u]);
}

// acc[2i + h] holds row i, columns 4h..4h+3 of the block; b holds 8 weight rows as vec4s
// along k. Adds the 8×8×4 product.
fn accumulate(acc: ptr<function, array<vec4<f32>, 16>>, a: ptr<function, array<vec4<f32>, 8>>, b: ptr<function, array<vec4<f32>, 8>>) {
    for (var kk = 0u; kk < 4u; kk++) {
        let lo = vec4((*b)[0][kk], (*b)[1][kk], (*b)[2][kk], (*b)[3][kk]);
        let hi = vec4((*b)[4][kk], (*b)[5][kk], (*b)[6][kk], (*b)[7][kk]);
        for (var i = 0u; i < BLOCK; i++) {
            let a_ik = (*a)[i][kk];
            (*acc)[2u * i] += a_ik * lo;
            (*acc)[2u * i + 1u] += a_ik * hi;
        }
    }
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let d_model = params.d_model;
    let d_ff = params.d_ff;
    let num_experts = params.num_experts;
    let tile_start_at = 2u * num_experts;
    let tile_expert_at = 3u * num_experts + 2u;
    let row_tile = ROW_LANES * BLOCK;
    let col_lanes = LANES / ROW_LANES;

    let tile = expert_table[tile_start_at + params.shard_first_expert] + workgroup_id.y;
    let expert = expert_table[tile_expert_at + tile];
    let shard_expert = expert - params.shard_first_expert;
    let rows_end = expert_table[tile_start_at + expert] * row_tile + expert_table[num_experts + expert];

    let row0 = tile * row_tile + (lane / col_lanes) * BLOCK;
    let col0 = (workgroup_id.x * col_lanes + lane % col_lanes) * BLOCK;

    // Padding rows read token 0 and columns past F re-read column F-1: the loop below then
    // needs no bounds checks, and the store skips them.
    var x_base: array<u32, 8>;
    var w_base: array<u32, 8>;
    for (var i = 0u; i < BLOCK; i++) {
        let slot = row0 + i;
        x_base[i] = select(0u, slot_token[slot], slot < rows_end) * d_model;
        w_base[i] = (shard_expert * d_ff + min(col0 + i, d_ff - 1u)) * d_model;
    }

    var acc1: array<vec4<f32>, 16>;
    var acc3: array<vec4<f32>, 16>;
    var a: array<vec4<f32>, 8>;
    var b: array<vec4<f32>, 8>;
    var k = 0u;
    for (; k + 4u <= d_model; k += 4u) {
        let b0 = w1_4(w_base[0] + k);
        let b1 = w1_4(w_base[1] + k);
        let b2 = w1_4(w_base[2] + k);
        let b3 = w1_4(w_base[3] + k);
        let b4 = w1_4(w_base[4] + k);
        let b5 = w1_4(w_base[5] + k);
        let b6 = w1_4(w_base[6] + k);
        let b7 = w1_4(w_base[7] + k);
        let lo0 = vec4(b0.x, b1.x, b2.x, b3.x);
        let lo1 = vec4(b0.y, b1.y, b2.y, b3.y);
        let lo2 = vec4(b0.z, b1.z, b2.z, b3.z);
        let lo3 = vec4(b0.w, b1.w, b2.w, b3.w);
        let hi0 = vec4(b4.x, b5.x, b6.x, b7.x);
        let hi1 = vec4(b4.y, b5.y, b6.y, b7.y);
        let hi2 = vec4(b4.z, b5.z, b6.z, b7.z);
        let hi3 = vec4(b4.w, b5.w, b6.w, b7.w);
        for (var i = 0u; i < BLOCK; i++) {
            let av = x4(x_base[i] + k);
            acc1[2u * i] += av.x * lo0 + av.y * lo1 + av.z * lo2 + av.w * lo3;
            acc1[2u * i + 1u] += av.x * hi0 + av.y * hi1 + av.z * hi2 + av.w * hi3;
        }
        if (GATED) {
            let g0 = w3_4(w_base[0] + k);
            let g1 = w3_4(w_base[1] + k);
            let g2 = w3_4(w_base[2] + k);
            let g3 = w3_4(w_base[3] + k);
            let g4 = w3_4(w_base[4] + k);
            let g5 = w3_4(w_base[5] + k);
            let g6 = w3_4(w_base[6] + k);
            let g7 = w3_4(w_base[7] + k);
            let glo0 = vec4(g0.x, g1.x, g2.x, g3.x);
            let glo1 = vec4(g0.y, g1.y, g2.y, g3.y);
            let glo2 = vec4(g0.z, g1.z, g2.z, g3.z);
            let glo3 = vec4(g0.w, g1.w, g2.w, g3.w);
            let ghi0 = vec4(g4.x, g5.x, g6.x, g7.x);
            let ghi1 = vec4(g4.y, g5.y, g6.y, g7.y);
            let ghi2 = vec4(g4.z, g5.z, g6.z, g7.z);
            let ghi3 = vec4(g4.w, g5.w, g6.w, g7.w);
            for (var i = 0u; i < BLOCK; i++) {
                let av = x4(x_base[i] + k);
                acc3[2u * i] += av.x * glo0 + av.y * glo1 + av.z * glo2 + av.w * glo3;
                acc3[2u * i + 1u] += av.x * ghi0 + av.y * ghi1 + av.z * ghi2 + av.w * ghi3;
            }
        }
    }
    // The last d_model % 4 columns, zero-padded into one more step.
    let rest = d_model - k;
    if (rest > 0u) {
        for (var i = 0u; i < BLOCK; i++) {
            a[i] = vec4(0.0);
            b[i] = vec4(0.0);
            for (var kk = 0u; kk < rest; kk++) {
                a[i][kk] = x[x_base[i] + k + kk];
                b[i][kk] = w1[w_base[i] + k + kk];
            }
        }
        accumulate(&acc1, &a, &b);
        if (GATED) {
            for (var j = 0u; j < BLOCK; j++) {
                b[j] = vec4(0.0);
                for (var kk = 0u; kk < rest; kk++) {
                    b[j][kk] = w3[w_base[j] + k + kk];
                }
            }
            accumulate(&acc3, &a, &b);
        }
    }

    let gate_bias_at = params.shard_num_experts * d_ff;
    for (var i = 0u; i < BLOCK; i++) {
        let slot = row0 + i;
        if (slot >= rows_end) {
            break;
        }
        for (var j = 0u; j < BLOCK; j++) {
            let col = col0 + j;
            if (col < d_ff) {
                let bias_at = shard_expert * d_ff + col;
                var h = activate(acc1[2u * i + j / 4u][j % 4u] + up_bias[bias_at]);
                if (GATED) {
                    h *= acc3[2u * i + j / 4u][j % 4u] + up_bias[gate_bias_at + bias_at];
                }
                hidden[slot * d_ff + col] = h;
            }
        }
    }
}
