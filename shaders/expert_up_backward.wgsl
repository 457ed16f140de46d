// expert_up_backward: the up-projections' weight gradients as grouped transposed matmuls
// over each expert's own rows (no atomics), on the core of grouped_matmul.wgsl (prepended
// with backward_common):
//   dW1[e, f, d] = Σ_{kept slots of e} dA[slot, f]·x[t, d]     (K = the expert's slots)
//   dW3 likewise from dV (gated FFNs)
// in slot order: the same bits on every run. With GATE_INPUT (gate_on: input) the expert's
// input was g·x: x's row of each slot is scaled by its gate (the forward's slot_gate),
// dW1 = Σ dA·(g·x), so that dA, db1 and the slots' input gradients stay those at g·x.
// db1 and db3 are expert_bias_backward's. CPU twin: cpu_backward_kernels::expert_up_backward.
//
// Dispatch: once per weight shard, x = column tiles of D, y = row tiles of F, z = the
// shard's experts (then its experts again for W3 when gated); the tiling is the layer's
// weight-gradient one. Slots past the expert's kept ones are masked to zero.
// Bindings: 0 params, 1 x_rows texels [layers][height][D4 / 4] (the training forward's),
// 2 slot_token [slots], 3 expert_table, 4 d_a [slots, F4] as vec4s, 5 d_v [slots, F4]
// (gated), 6 shard (its ShardParams), 7 the shard's gradients as vec4s (rows padded:
// backward_common.wgsl), 8 slot_gate [slots] (read only with GATE_INPUT).

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var x_rows: texture_2d_array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var<storage, read> d_a: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> d_v: array<vec4<f32>>;
@group(0) @binding(6) var<uniform> shard: ShardParams;
@group(0) @binding(7) var<storage, read_write> gradients: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> slot_gate: array<f32>;

override GATE_INPUT: bool = false;

var<private> expert: u32;
var<private> local_expert: u32;
var<private> of_w3: bool;
var<private> first_slot: u32;
var<private> slots_end: u32;
var<private> block_row0: u32;
var<private> block_col0: u32;
var<private> last_col_quad: u32;
var<private> height: u32;
// The step's four slots (their x rows' texels).
var<private> step: SlotStep;

fn prepare_k(k4: u32) {
    step = slot_step(first_slot, slots_end, k4, height);
}

// Column c: dA (dV) of the step's slot c at rows f .. f + 4 of the block's row quad (zeros
// for slots past the kept ones).
fn a_quad(row_quad: u32, k4: u32) -> mat4x4<f32> {
    let f4 = block_row0 / 4u + row_quad;
    let at = step.slots * (params.hidden_stride / 4u) + vec4(f4);
    let zero = vec4(0.0);
    if (of_w3) {
        return mat4x4(select(zero, d_v[at.x], step.kept.x), select(zero, d_v[at.y], step.kept.y),
            select(zero, d_v[at.z], step.kept.z), select(zero, d_v[at.w], step.kept.w));
    }
    return mat4x4(select(zero, d_a[at.x], step.kept.x), select(zero, d_a[at.y], step.kept.y),
        select(zero, d_a[at.z], step.kept.z), select(zero, d_a[at.w], step.kept.w));
}

// Row c: x of the step's slot c at the column quad.
fn b_quad(col_quad: u32, k4: u32) -> mat4x4<f32> {
    let d4 = min(block_col0 / 4u + col_quad, last_col_quad);
    var rows = mat4x4(textureLoad(x_rows, vec2(d4, step.texels.row.x), step.texels.layer.x, 0),
        textureLoad(x_rows, vec2(d4, step.texels.row.y), step.texels.layer.y, 0),
        textureLoad(x_rows, vec2(d4, step.texels.row.z), step.texels.layer.z, 0),
        textureLoad(x_rows, vec2(d4, step.texels.row.w), step.texels.layer.w, 0));
    if (GATE_INPUT) {
        // Slots past the kept ones are masked in a_quad; their gate is never read.
        let slots = select(vec4(first_slot), step.slots, step.kept);
        rows[0] *= slot_gate[slots.x];
        rows[1] *= slot_gate[slots.y];
        rows[2] *= slot_gate[slots.z];
        rows[3] *= slot_gate[slots.w];
    }
    return transpose(rows);
}

// Rows of the quad go out as vec4s: the padding columns past D get x's zero padding.
fn store_quad(value: mat4x4<f32>, row_quad: u32, col_quad: u32) {
    let d_ff = params.d_ff;
    let d4 = (params.d_model + 3u) / 4u;
    let col4 = block_col0 / 4u + col_quad;
    if (col4 >= d4) {
        return;
    }
    let matrix_at = select(shard.w1_at, shard.w3_at, of_w3) / 4u;
    let rows = transpose(value);
    for (var r = 0u; r < 4u; r++) {
        let f = block_row0 + 4u * row_quad + r;
        if (f >= d_ff) {
            break;
        }
        let at = matrix_at + (local_expert * d_ff + f) * d4 + col4;
        gradients[at] = accumulated(at, rows[r]);
    }
}

// `value`, plus what the earlier chunks of the batch left at `at` (accumulate).
fn accumulated(at: u32, value: vec4<f32>) -> vec4<f32> {
    if (params.accumulate != 0u) {
        return gradients[at] + value;
    }
    return value;
}

@compute @workgroup_size(LANES)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let n = params.num_experts;
    local_expert = workgroup_id.z % shard.num_experts;
    expert = shard.first_expert + local_expert;
    of_w3 = workgroup_id.z >= shard.num_experts;
    first_slot = expert_table[2u * n + expert] * params.row_tile;
    let kept = expert_table[n + expert];
    slots_end = first_slot + kept;
    let origin = block_origin(workgroup_id.y, workgroup_id.x, lane);
    block_row0 = origin.x;
    block_col0 = origin.y;
    height = textureDimensions(x_rows).y;
    last_col_quad = (params.d_model + 3u) / 4u - 1u;
    var block: Block;
    multiply(&block, 0u, (kept + 3u) / 4u);
    store_block(block);
}
