// expert_up: the up-projection of every expert in ONE dispatch (a grouped matmul).
// H[slot, f] = act(x[slot_token[slot]]·W1[e, f] + b1[e, f])
//              (⊙ (x[slot_token[slot]]·W3[e, f] + b3[e, f]) when GATED)
// for every kept slot, where e is the expert owning the slot's row tile.
//
// Dispatch (indirect, arguments from scan_expert_offsets): x = column tiles of F,
// y = the row tiles of this weight shard's experts. Each workgroup of 8×8 invocations
// computes a 32×32 output tile, each invocation a 4×4 block held in registers. The row
// gather x[slot_token[...]] happens in the operand loads: no permuted copy of x exists.
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

const TILE_ROWS: u32 = 4u;
const TILE_COLS: u32 = 4u;
const LANES_X: u32 = 8u;
const ROW_TILE: u32 = 32u;
const COL_TILE: u32 = 32u;

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

    let tile = expert_table[tile_start_at + params.shard_first_expert] + workgroup_id.y;
    let expert = expert_table[tile_expert_at + tile];
    let shard_expert = expert - params.shard_first_expert;
    let rows_end = expert_table[tile_start_at + expert] * ROW_TILE + expert_table[num_experts + expert];

    let row0 = tile * ROW_TILE + (lane / LANES_X) * TILE_ROWS;
    let col0 = workgroup_id.x * COL_TILE + (lane % LANES_X) * TILE_COLS;

    // Padding rows read token 0 and columns past F re-read column F-1: the loop below then
    // needs no bounds checks, and the store skips them.
    var x_base: array<u32, 4>;
    var w_base: array<u32, 4>;
    for (var i = 0u; i < TILE_ROWS; i++) {
        let slot = row0 + i;
        x_base[i] = select(0u, slot_token[slot], slot < rows_end) * d_model;
    }
    for (var j = 0u; j < TILE_COLS; j++) {
        w_base[j] = (shard_expert * d_ff + min(col0 + j, d_ff - 1u)) * d_model;
    }

    var acc1: array<vec4<f32>, 4>;
    var acc3: array<vec4<f32>, 4>;
    var k = 0u;
    for (; k + 4u <= d_model; k += 4u) {
        let b0 = w1_4(w_base[0] + k);
        let b1 = w1_4(w_base[1] + k);
        let b2 = w1_4(w_base[2] + k);
        let b3 = w1_4(w_base[3] + k);
        // Columns of the 4×4 weight block, one per k step.
        let bk = array<vec4<f32>, 4>(
            vec4(b0.x, b1.x, b2.x, b3.x), vec4(b0.y, b1.y, b2.y, b3.y),
            vec4(b0.z, b1.z, b2.z, b3.z), vec4(b0.w, b1.w, b2.w, b3.w));
        var gk: array<vec4<f32>, 4>;
        if (GATED) {
            let g0 = w3_4(w_base[0] + k);
            let g1 = w3_4(w_base[1] + k);
            let g2 = w3_4(w_base[2] + k);
            let g3 = w3_4(w_base[3] + k);
            gk = array<vec4<f32>, 4>(
                vec4(g0.x, g1.x, g2.x, g3.x), vec4(g0.y, g1.y, g2.y, g3.y),
                vec4(g0.z, g1.z, g2.z, g3.z), vec4(g0.w, g1.w, g2.w, g3.w));
        }
        for (var i = 0u; i < TILE_ROWS; i++) {
            let a = x4(x_base[i] + k);
            acc1[i] += a.x * bk[0] + a.y * bk[1] + a.z * bk[2] + a.w * bk[3];
            if (GATED) {
                acc3[i] += a.x * gk[0] + a.y * gk[1] + a.z * gk[2] + a.w * gk[3];
            }
        }
    }
    for (; k < d_model; k++) {
        let bk = vec4(w1[w_base[0] + k], w1[w_base[1] + k], w1[w_base[2] + k], w1[w_base[3] + k]);
        var gk = vec4(0.0);
        if (GATED) {
            gk = vec4(w3[w_base[0] + k], w3[w_base[1] + k], w3[w_base[2] + k], w3[w_base[3] + k]);
        }
        for (var i = 0u; i < TILE_ROWS; i++) {
            let a = x[x_base[i] + k];
            acc1[i] += a * bk;
            if (GATED) {
                acc3[i] += a * gk;
            }
        }
    }

    let gate_bias_at = params.shard_num_experts * d_ff;
    for (var i = 0u; i < TILE_ROWS; i++) {
        let slot = row0 + i;
        if (slot >= rows_end) {
            break;
        }
        for (var j = 0u; j < TILE_COLS; j++) {
            let col = col0 + j;
            if (col < d_ff) {
                let bias_at = shard_expert * d_ff + col;
                var h = activate(acc1[i][j] + up_bias[bias_at]);
                if (GATED) {
                    h *= acc3[i][j] + up_bias[gate_bias_at + bias_at];
                }
                hidden[slot * d_ff + col] = h;
            }
        }
    }
}
