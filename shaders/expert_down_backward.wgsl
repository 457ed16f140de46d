// expert_down_backward: the down-projection's weight gradient as a grouped transposed
// matmul over each expert's own rows (ScatterMoE's "XtY", no atomics), on the core of
// grouped_matmul.wgsl (prepended with backward_common):
//   dW2[e, d, f] = Σ_{kept slots of e} s·dy[t, d]·H[slot, f]      (K = the expert's slots)
// with H the hidden rows the training forward left in `hidden`; every element sums the
// expert's slots in slot order: the same bits on every run. db2 is expert_bias_backward's.
// CPU twin: cpu_backward_kernels::expert_down_backward.
//
// Dispatch: once per weight shard, x = column tiles of F, y = row tiles of D, z = the
// shard's experts; the tiling is the layer's weight-gradient one. Slots past the expert's
// kept ones are masked to zero.
// Bindings: 0 params, 1 dy_rows texels [layers][height][D4 / 4], 2 slot_token [slots],
// 3 expert_table, 4 slot_scale [slots], 5 hidden [slots, F4] as vec4s, 6 shard (its
// ShardParams), 7 the shard's gradients as vec4s (rows padded: backward_common.wgsl).

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var dy_rows: texture_2d_array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var<storage, read> slot_scale: array<f32>;
@group(0) @binding(5) var<storage, read> hidden: array<vec4<f32>>;
@group(0) @binding(6) var<uniform> shard: ShardParams;
@group(0) @binding(7) var<storage, read_write> gradients: array<vec4<f32>>;

var<private> expert: u32;
var<private> local_expert: u32;
var<private> first_slot: u32;
var<private> slots_end: u32;
var<private> block_row0: u32;
var<private> block_col0: u32;
var<private> last_col_quad: u32;
var<private> height: u32;
// The step's four slots (their dy rows' texels) and their gate scales (0 past the kept).
var<private> step: SlotStep;
var<private> step_scale: vec4<f32>;

fn prepare_k(k4: u32) {
    step = slot_step(first_slot, slots_end, k4, height);
    let s = select(vec4(first_slot), step.slots, step.kept);
    step_scale = select(vec4(0.0), vec4(slot_scale[s.x], slot_scale[s.y], slot_scale[s.z],
        slot_scale[s.w]), step.kept);
}

// Column c: s·dy of the step's slot c at rows d .. d + 4 of the block's row quad.
fn a_quad(row_quad: u32, k4: u32) -> mat4x4<f32> {
    let d4 = block_row0 / 4u + row_quad;
    return mat4x4(step_scale.x * textureLoad(dy_rows, vec2(d4, step.texels.row.x), step.texels.layer.x, 0),
        step_scale.y * textureLoad(dy_rows, vec2(d4, step.texels.row.y), step.texels.layer.y, 0),
        step_scale.z * textureLoad(dy_rows, vec2(d4, step.texels.row.z), step.texels.layer.z, 0),
        step_scale.w * textureLoad(dy_rows, vec2(d4, step.texels.row.w), step.texels.layer.w, 0));
}

// Row c: H of the step's slot c at the column quad (zeros for slots past the kept ones).
fn b_quad(col_quad: u32, k4: u32) -> mat4x4<f32> {
    let f4 = min(block_col0 / 4u + col_quad, last_col_quad);
    let stride = params.hidden_stride / 4u;
    let at = step.slots * stride + vec4(f4);
    let zero = vec4(0.0);
    return transpose(mat4x4(select(zero, hidden[at.x], step.kept.x),
        select(zero, hidden[at.y], step.kept.y), select(zero, hidden[at.z], step.kept.z),
        select(zero, hidden[at.w], step.kept.w)));
}

// Rows of the quad go out as vec4s: the padding columns past F get H's zero padding.
fn store_quad(value: mat4x4<f32>, row_quad: u32, col_quad: u32) {
    let d_model = params.d_model;
    let f4 = params.hidden_stride / 4u;
    let col4 = block_col0 / 4u + col_quad;
    if (col4 >= f4) {
        return;
    }
    let rows = transpose(value);
    for (var r = 0u; r < 4u; r++) {
        let d = block_row0 + 4u * row_quad + r;
        if (d >= d_model) {
            break;
        }
        let at = shard.w2_at / 4u + (local_expert * d_model + d) * f4 + col4;
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
    local_expert = workgroup_id.z;
    expert = shard.first_expert + local_expert;
    first_slot = expert_table[2u * n + expert] * params.row_tile;
    let kept = expert_table[n + expert];
    slots_end = first_slot + kept;
    let origin = block_origin(workgroup_id.y, workgroup_id.x, lane);
    block_row0 = origin.x;
    block_col0 = origin.y;
    height = textureDimensions(dy_rows).y;
    last_col_quad = (params.d_ff + 3u) / 4u - 1u;
    var block: Block;
    multiply(&block, 0u, (kept + 3u) / 4u);
    store_block(block);
}
