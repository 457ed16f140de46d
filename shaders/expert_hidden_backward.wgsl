// expert_hidden_backward: per kept slot, the gradients of the expert's pre-activations, as
// a grouped matmul over every expert at once (the core of grouped_matmul.wgsl, which the
// shader registry prepends with backward_common and activation):
//   dH[slot]  = s·dy[t]·W2[e]                 (K = D; W2 [D, F] read transposed)
//   dA = dH·g(v)·act′(a),  dV = dH·act(a)·g′(v)   (dA = dH·act′(a) ungated; g(v) = v,
//                                               or swiglu_oai's clamp(v, −L, L) + 1)
// where a and v are the pre-activations the training forward's expert_up stored. CPU twin:
// cpu_backward_kernels::expert_hidden_backward.
//
// Dispatch: indirect, with the training forward's up arguments for this weight shard
// (x = column tiles of F, y = the shard's row tiles) and its tiling: the same row tiles, so
// every tile belongs to one expert. Rows past the expert's kept slots are not written;
// columns F .. F4 get zeros, so the kernels after it read dA and dV as vec4s.
// Bindings: 0 params, 1 shard (expert_up's ExpertParams of this shard), 2 dy_rows texels
// [layers][height][D4 / 4] (dy staged like x), 3 slot_token [slots], 4 expert_table,
// 5 slot_scale [slots], 6 w2 quants (f32 bits, [shard experts][D4 / 4][F4]), 7 pre_activations
// [slots][F4] a, each followed by its v when gated (expert_up's), 8 d_a [slots, F4], 9 d_v
// [slots, F4].

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<uniform> shard: ExpertParams;
@group(0) @binding(2) var dy_rows: texture_2d_array<f32>;
@group(0) @binding(3) var<storage, read> slot_token: array<u32>;
@group(0) @binding(4) var<storage, read> expert_table: array<u32>;
@group(0) @binding(5) var<storage, read> slot_scale: array<f32>;
@group(0) @binding(6) var w2_quants: texture_2d_array<u32>;
@group(0) @binding(7) var<storage, read> pre_activations: array<f32>;
@group(0) @binding(8) var<storage, read_write> d_a: array<f32>;
@group(0) @binding(9) var<storage, read_write> d_v: array<f32>;

// The block's operands: dy's texture rows and layers of its 4 row quads' slots, the shard
// layer of their expert, and its first weight column quad.
var<private> dy_row: array<vec4<u32>, 4>;
var<private> dy_layer: array<vec4<u32>, 4>;
var<private> expert_layer: u32;
var<private> col_quad0: u32;
var<private> last_col_quad: u32;
var<private> block_row0: u32;
var<private> block_col0: u32;
var<private> rows_end: u32;

// Nothing is shared along k beyond the block's own rows.
fn prepare_k(k4: u32) {}

fn a_quad(row_quad: u32, k4: u32) -> mat4x4<f32> {
    let rows = dy_row[row_quad];
    let layers = dy_layer[row_quad];
    return transpose(mat4x4(textureLoad(dy_rows, vec2(k4, rows.x), layers.x, 0),
        textureLoad(dy_rows, vec2(k4, rows.y), layers.y, 0),
        textureLoad(dy_rows, vec2(k4, rows.z), layers.z, 0),
        textureLoad(dy_rows, vec2(k4, rows.w), layers.w, 0)));
}

fn b_quad(col_quad: u32, k4: u32) -> mat4x4<f32> {
    // Column quads past F re-read the last one (their columns are not stored).
    return transposed_quad(w2_quants, min(col_quad0 + col_quad, last_col_quad), k4, expert_layer);
}

fn store_quad(value: mat4x4<f32>, row_quad: u32, col_quad: u32) {
    let d_ff = params.d_ff;
    let f4 = params.hidden_stride;
    let gated = params.gated != 0u;
    let pre_stride = select(1u, 2u, gated) * f4;
    for (var r = 0u; r < 4u; r++) {
        let slot = block_row0 + 4u * row_quad + r;
        if (slot >= rows_end) {
            break;
        }
        let scale = slot_scale[slot];
        for (var c = 0u; c < 4u; c++) {
            let unit = block_col0 + 4u * col_quad + c;
            let at = slot * f4 + unit;
            if (unit < d_ff) {
                let grad_h = value[c][r] * scale;
                let a = pre_activations[slot * pre_stride + unit];
                if (gated) {
                    let v = pre_activations[slot * pre_stride + f4 + unit];
                    d_a[at] = grad_h * gate_value(v) * activation_derivative(a);
                    d_v[at] = grad_h * activate(a) * gate_derivative(v);
                } else {
                    d_a[at] = grad_h * activation_derivative(a);
                }
            } else if (unit < f4) {
                d_a[at] = 0.0;
                if (gated) {
                    d_v[at] = 0.0;
                }
            }
        }
    }
}

@compute @workgroup_size(LANES)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let tile = slot_tile(workgroup_id, lane);
    expert_layer = tile.layer;
    rows_end = tile.rows_end;
    block_row0 = tile.origin.x;
    block_col0 = tile.origin.y;
    col_quad0 = tile.origin.y / 4u;
    last_col_quad = (params.d_ff + 3u) / 4u - 1u;
    // Rows past the expert's slots read token 0; they are not stored.
    let height = textureDimensions(dy_rows).y;
    for (var q = 0u; q < ROW_QUADS; q++) {
        let slots = vec4(block_row0 + 4u * q) + vec4(0u, 1u, 2u, 3u);
        let tokens = vec4(slot_token[slots.x], slot_token[slots.y], slot_token[slots.z],
            slot_token[slots.w]);
        let texels = token_texels(select(vec4(0u), tokens, slots < vec4(rows_end)), height);
        dy_row[q] = texels.row;
        dy_layer[q] = texels.layer;
    }
    var block: Block;
    multiply(&block, 0u, (params.d_model + 3u) / 4u);
    store_block(block);
}
