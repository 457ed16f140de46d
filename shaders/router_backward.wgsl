// router_backward: the router's weight gradients from dL/dh (gate_backward), as a matmul
// over the tokens on the core of grouped_matmul.wgsl (prepended with backward_common):
//   dWr[e, d] = Σ_t dh[t, e]·x[t, d]     (K = T),     dbr[e] = Σ_t dh[t, e]
// over the router's rows R (the routed experts, and a shared expert's gate), each summed
// over the tokens in order: the same bits on every run; zeros after a pre-routed forward
// (the router was not in its graph). The shared gate has no bias: its place in a router
// bias gets 0, so that it stays 0. CPU twin:
// cpu_backward_kernels::router_backward.
//
// Dispatch: x = column tiles of D, y = row tiles of N, with the layer's weight-gradient
// tiling; the invocations holding column 0 also sum the biases of their rows. Tokens past
// T are masked to zero.
// Bindings: 0 params, 1 x_rows texels [layers][height][D4 / 4] (the training forward's),
// 2 d_logits [T, R], 3 the router's gradients (weight, then bias: backward_common.wgsl).

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var x_rows: texture_2d_array<f32>;
@group(0) @binding(2) var<storage, read> d_logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> gradients: array<f32>;

var<private> block_row0: u32;
var<private> block_col0: u32;
var<private> last_col_quad: u32;
var<private> num_tokens: u32;
var<private> height: u32;
// The step's four tokens: in the batch or not, and their x texture rows and layers.
var<private> step_kept: vec4<bool>;
var<private> step_row: vec4<u32>;
var<private> step_layer: vec4<u32>;
var<private> step_at: vec4<u32>;

fn prepare_k(k4: u32) {
    let tokens = vec4(4u * k4) + vec4(0u, 1u, 2u, 3u);
    step_kept = tokens < vec4(num_tokens);
    let kept = select(vec4(0u), tokens, step_kept);
    let texels = token_texels(kept, height);
    step_row = texels.row;
    step_layer = texels.layer;
    step_at = kept * params.router_rows;
}

// dh of 4 experts from e0 for the token at `at` (zeros past the batch).
fn dh4(at: u32, e0: u32, kept: bool) -> vec4<f32> {
    let i = at + e0;
    return select(vec4(0.0), vec4(d_logits[i], d_logits[i + 1u], d_logits[i + 2u],
        d_logits[i + 3u]), kept);
}

// Column c: dh of the step's token c at the block's row quad of experts (experts past N
// feed only rows that are not stored).
fn a_quad(row_quad: u32, k4: u32) -> mat4x4<f32> {
    let e0 = block_row0 + 4u * row_quad;
    return mat4x4(dh4(step_at.x, e0, step_kept.x), dh4(step_at.y, e0, step_kept.y),
        dh4(step_at.z, e0, step_kept.z), dh4(step_at.w, e0, step_kept.w));
}

// Row c: x of the step's token c at the column quad.
fn b_quad(col_quad: u32, k4: u32) -> mat4x4<f32> {
    let d4 = min(block_col0 / 4u + col_quad, last_col_quad);
    let zero = vec4(0.0);
    return transpose(mat4x4(
        select(zero, textureLoad(x_rows, vec2(d4, step_row.x), step_layer.x, 0), step_kept.x),
        select(zero, textureLoad(x_rows, vec2(d4, step_row.y), step_layer.y, 0), step_kept.y),
        select(zero, textureLoad(x_rows, vec2(d4, step_row.z), step_layer.z, 0), step_kept.z),
        select(zero, textureLoad(x_rows, vec2(d4, step_row.w), step_layer.w, 0), step_kept.w)));
}

fn store_quad(value: mat4x4<f32>, row_quad: u32, col_quad: u32) {
    let d_model = params.d_model;
    for (var r = 0u; r < 4u; r++) {
        let e = block_row0 + 4u * row_quad + r;
        if (e >= params.router_rows) {
            break;
        }
        for (var c = 0u; c < 4u; c++) {
            let d = block_col0 + 4u * col_quad + c;
            if (d < d_model) {
                let at = params.router_weight_at + e * d_model + d;
                gradients[at] = select(0.0, gradients[at], params.accumulate != 0u) + value[c][r];
            }
        }
    }
}

@compute @workgroup_size(LANES)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    num_tokens = select(params.num_tokens, 0u, params.pre_routed != 0u);
    height = textureDimensions(x_rows).y;
    let origin = block_origin(workgroup_id.y, workgroup_id.x, lane);
    block_row0 = origin.x;
    block_col0 = origin.y;
    last_col_quad = (params.d_model + 3u) / 4u - 1u;
    var block: Block;
    multiply(&block, 0u, (num_tokens + 3u) / 4u);
    store_block(block);
    if (block_col0 != 0u || params.router_bias_at == ABSENT) {
        return;
    }
    let n = params.router_rows;
    for (var e = block_row0; e < min(block_row0 + 4u * ROW_QUADS, n); e++) {
        var sum = 0.0;
        let tokens = select(num_tokens, 0u, e >= params.routed_experts);
        for (var t = 0u; t < tokens; t++) {
            sum += d_logits[t * n + e];
        }
        let at = params.router_bias_at + e;
        gradients[at] = select(0.0, gradients[at], params.accumulate != 0u) + sum;
    }
}
