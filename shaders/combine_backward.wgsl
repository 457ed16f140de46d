// combine_backward: dx gathered per token (no scatter, no atomics), the router's term as a
// matmul on the core of grouped_matmul.wgsl (prepended with backward_common):
//   dx[t, d] = Σ_e dh[t, e]·Wr[e, d] + Σ_{kept j} dXslot[assignment_slot[t, j], d]
//              + π[t]·dy[t, d]
// the router's term first (K = R, its rows: the routed experts and a shared expert's gate;
// none after a pre-routed forward), then the choices (routed, then a shared expert's
// slices) in choice order, then the pass-through. With GATE_INPUT (gate_on: input) the
// expert's input was g·x: a slot's term is g·dXslot (its gate, the forward's slot_gate).
// CPU twin: cpu_backward_kernels::combine_backward.
//
// Dispatch: x = column tiles of D, y = row tiles of T, with the layer's weight-gradient
// tiling. Rows past R are masked to zero.
// Bindings: 0 params, 1 dy [T, D], 2 d_logits [T, R], 3 assignment_slot [T, k],
// 4 d_x_slot [slots, D], 5 pass_scale [T], 6 router [R][D4 / 4] texels (the forward's),
// 7 dx [T, D], 8 slot_gate [slots] (read only with GATE_INPUT).

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> d_logits: array<f32>;
@group(0) @binding(3) var<storage, read> assignment_slot: array<u32>;
@group(0) @binding(4) var<storage, read> d_x_slot: array<f32>;
@group(0) @binding(5) var<storage, read> pass_scale: array<f32>;
@group(0) @binding(6) var router: texture_2d<f32>;
@group(0) @binding(7) var<storage, read_write> dx: array<f32>;
@group(0) @binding(8) var<storage, read> slot_gate: array<f32>;

override GATE_INPUT: bool = false;

var<private> block_row0: u32;
var<private> block_col0: u32;
var<private> last_col_quad: u32;
// The first dh of each of the block's rows (clamped to the last token), per row quad.
var<private> row_at: array<vec4<u32>, 4>;

// Nothing is shared along k beyond the block's own rows.
fn prepare_k(k4: u32) {}

// dh of 4 router rows from e0 at `at` (zeros past R).
fn dh4(at: u32, e0: u32) -> vec4<f32> {
    let kept = vec4(e0) + vec4(0u, 1u, 2u, 3u) < vec4(params.router_rows);
    let i = at + e0;
    return select(vec4(0.0), vec4(d_logits[i], d_logits[i + 1u], d_logits[i + 2u],
        d_logits[i + 3u]), kept);
}

fn a_quad(row_quad: u32, k4: u32) -> mat4x4<f32> {
    let at = row_at[row_quad];
    let e0 = 4u * k4;
    return transpose(mat4x4(dh4(at.x, e0), dh4(at.y, e0), dh4(at.z, e0), dh4(at.w, e0)));
}

// Row c: the router row of expert 4·k4 + c at the column quad.
fn b_quad(col_quad: u32, k4: u32) -> mat4x4<f32> {
    let d4 = min(block_col0 / 4u + col_quad, last_col_quad);
    return transpose(mat4x4(textureLoad(router, vec2(d4, 4u * k4), 0),
        textureLoad(router, vec2(d4, 4u * k4 + 1u), 0),
        textureLoad(router, vec2(d4, 4u * k4 + 2u), 0),
        textureLoad(router, vec2(d4, 4u * k4 + 3u), 0)));
}

fn store_quad(value: mat4x4<f32>, row_quad: u32, col_quad: u32) {
    let d_model = params.d_model;
    let k = params.top_k;
    for (var r = 0u; r < 4u; r++) {
        let token = block_row0 + 4u * row_quad + r;
        if (token >= params.num_tokens) {
            break;
        }
        for (var c = 0u; c < 4u; c++) {
            let d = block_col0 + 4u * col_quad + c;
            if (d >= d_model) {
                break;
            }
            var sum = value[c][r];
            for (var j = 0u; j < k; j++) {
                let slot = assignment_slot[token * k + j];
                if (slot == DROPPED) {
                    continue;
                }
                if (GATE_INPUT) {
                    sum += slot_gate[slot] * d_x_slot[slot * d_model + d];
                } else {
                    sum += d_x_slot[slot * d_model + d];
                }
            }
            let at = token * d_model + d;
            dx[at] = sum + pass_scale[token] * dy[at];
        }
    }
}

@compute @workgroup_size(LANES)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let origin = block_origin(workgroup_id.y, workgroup_id.x, lane);
    block_row0 = origin.x;
    block_col0 = origin.y;
    last_col_quad = (params.d_model + 3u) / 4u - 1u;
    let n = select(params.router_rows, 0u, params.pre_routed != 0u);
    let last_token = max(params.num_tokens, 1u) - 1u;
    for (var q = 0u; q < ROW_QUADS; q++) {
        let tokens = min(vec4(block_row0 + 4u * q) + vec4(0u, 1u, 2u, 3u), vec4(last_token));
        row_at[q] = tokens * params.router_rows;
    }
    var block: Block;
    multiply(&block, 0u, (n + 3u) / 4u);
    store_block(block);
}
