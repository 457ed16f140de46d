// expert_input_backward: per kept slot, the gradient of the expert's input row through the
// transposed up-projections, as a grouped matmul over every expert at once (the core of
// grouped_matmul.wgsl, which the shader registry prepends with backward_common):
//   dXslot[slot] = dA[slot]·W1[e] (+ dV[slot]·W3[e] when gated)     (K = F, then F again)
// W1 [F, D] and W3 read transposed from the forward's textures; W1's terms before W3's.
// combine_backward gathers the slots of each token. CPU twin:
// cpu_backward_kernels::expert_input_backward.
//
// Dispatch: indirect, with the training forward's down arguments for this weight shard
// (x = column tiles of D, y = the shard's row tiles) and its tiling. Rows past the expert's
// kept slots are not written.
// Bindings: 0 params, 1 shard (ExpertParams of this shard), 2 expert_table, 3 d_a
// [slots, F4], 4 d_v [slots, F4] (gated), 5 w1 quants, 6 w3 quants (f32 bits, [shard
// experts][F4 / 4][D4]; W1's again when not gated), 7 d_x_slot [slots, D].

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<uniform> shard: ExpertParams;
@group(0) @binding(2) var<storage, read> expert_table: array<u32>;
@group(0) @binding(3) var<storage, read> d_a: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> d_v: array<vec4<f32>>;
@group(0) @binding(5) var w1_quants: texture_2d_array<u32>;
@group(0) @binding(6) var w3_quants: texture_2d_array<u32>;
@group(0) @binding(7) var<storage, read_write> d_x_slot: array<f32>;

// The block's operands: the vec4 offsets of its row quads' slots in dA (dV), the shard
// layer of their expert, its first weight column quad, and which projection runs (W3's
// with dV after W1's with dA).
var<private> slot_at: array<vec4<u32>, 4>;
var<private> expert_layer: u32;
var<private> col_quad0: u32;
var<private> last_col_quad: u32;
var<private> block_row0: u32;
var<private> block_col0: u32;
var<private> rows_end: u32;
var<private> of_w3: bool;

// Nothing is shared along k beyond the block's own rows.
fn prepare_k(k4: u32) {}

fn a_quad(row_quad: u32, k4: u32) -> mat4x4<f32> {
    let at = slot_at[row_quad] + vec4(k4);
    if (of_w3) {
        return transpose(mat4x4(d_v[at.x], d_v[at.y], d_v[at.z], d_v[at.w]));
    }
    return transpose(mat4x4(d_a[at.x], d_a[at.y], d_a[at.z], d_a[at.w]));
}

fn b_quad(col_quad: u32, k4: u32) -> mat4x4<f32> {
    // Column quads past D re-read the last one (their columns are not stored).
    let col4 = min(col_quad0 + col_quad, last_col_quad);
    if (of_w3) {
        return transposed_quad(w3_quants, col4, k4, expert_layer);
    }
    return transposed_quad(w1_quants, col4, k4, expert_layer);
}

fn store_quad(value: mat4x4<f32>, row_quad: u32, col_quad: u32) {
    let d_model = params.d_model;
    for (var r = 0u; r < 4u; r++) {
        let slot = block_row0 + 4u * row_quad + r;
        if (slot >= rows_end) {
            break;
        }
        for (var c = 0u; c < 4u; c++) {
            let column = block_col0 + 4u * col_quad + c;
            if (column < d_model) {
                d_x_slot[slot * d_model + column] = value[c][r];
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
    last_col_quad = (params.d_model + 3u) / 4u - 1u;
    // Rows past the expert's slots read the padding rows of their tile (they are in the
    // buffer and not stored).
    let f_quads = params.hidden_stride / 4u;
    for (var q = 0u; q < ROW_QUADS; q++) {
        slot_at[q] = (vec4(block_row0 + 4u * q) + vec4(0u, 1u, 2u, 3u)) * f_quads;
    }
    var block: Block;
    of_w3 = false;
    multiply(&block, 0u, f_quads);
    if (params.gated != 0u) {
        of_w3 = true;
        multiply(&block, 0u, f_quads);
    }
    store_block(block);
}
