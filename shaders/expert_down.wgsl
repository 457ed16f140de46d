// expert_down: the down-projection of every expert in ONE dispatch (a grouped matmul).
// O[slot, d] = H[slot]·W2[e, d] + b2[e, d] for every kept slot, where e is the expert
// owning the slot's row tile.
//
// Dispatch (indirect, arguments from scan_expert_offsets): x = column tiles of D,
// y = the row tiles of this weight shard's experts; 8×8 invocations per workgroup, each
// computing a 4×4 block of a 32×32 output tile in registers.
// Bindings: 0 params, 1 hidden [slots, F], 2 expert_table, 3 w2 [shard experts, D, F],
// 4 down_bias [shard experts, D], 5 expert_out [slots, D].

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

const TILE_ROWS: u32 = 4u;
const TILE_COLS: u32 = 4u;
const LANES_X: u32 = 8u;
const ROW_TILE: u32 = 32u;
const COL_TILE: u32 = 32u;

@group(0) @binding(0) var<uniform> params: ExpertParams;
@group(0) @binding(1) var<storage, read> hidden: array<f32>;
@group(0) @binding(2) var<storage, read> expert_table: array<u32>;
@group(0) @binding(3) var<storage, read> w2: array<f32>;
@group(0) @binding(4) var<storage, read> down_bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> expert_out: array<f32>;

fn hidden4(at: u32) -> vec4<f32> {
    return vec4(hidden[at], hidden[at + 1u], hidden[at + 2u], hidden[at + 3u]);
}

fn w2_4(at: u32) -> vec4<f32> {
    return vec4(w2[at], w2[at + 1u], w2[at + 2u], w2[at + 3u]);
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

    // Padding rows exist in `hidden` (it holds whole row tiles) and are never stored;
    // columns past D re-read column D-1 so the loop needs no bounds checks.
    var h_base: array<u32, 4>;
    var w_base: array<u32, 4>;
    for (var i = 0u; i < TILE_ROWS; i++) {
        h_base[i] = (row0 + i) * d_ff;
    }
    for (var j = 0u; j < TILE_COLS; j++) {
        w_base[j] = (shard_expert * d_model + min(col0 + j, d_model - 1u)) * d_ff;
    }

    var acc: array<vec4<f32>, 4>;
    var k = 0u;
    for (; k + 4u <= d_ff; k += 4u) {
        let b0 = w2_4(w_base[0] + k);
        let b1 = w2_4(w_base[1] + k);
        let b2 = w2_4(w_base[2] + k);
        let b3 = w2_4(w_base[3] + k);
        let bk = array<vec4<f32>, 4>(
            vec4(b0.x, b1.x, b2.x, b3.x), vec4(b0.y, b1.y, b2.y, b3.y),
            vec4(b0.z, b1.z, b2.z, b3.z), vec4(b0.w, b1.w, b2.w, b3.w));
        for (var i = 0u; i < TILE_ROWS; i++) {
            let a = hidden4(h_base[i] + k);
            acc[i] += a.x * bk[0] + a.y * bk[1] + a.z * bk[2] + a.w * bk[3];
        }
    }
    for (; k < d_ff; k++) {
        let bk = vec4(w2[w_base[0] + k], w2[w_base[1] + k], w2[w_base[2] + k], w2[w_base[3] + k]);
        for (var i = 0u; i < TILE_ROWS; i++) {
            acc[i] += hidden[h_base[i] + k] * bk;
        }
    }

    for (var i = 0u; i < TILE_ROWS; i++) {
        let slot = row0 + i;
        if (slot >= rows_end) {
            break;
        }
        for (var j = 0u; j < TILE_COLS; j++) {
            let col = col0 + j;
            if (col < d_model) {
                expert_out[slot * d_model + col] = acc[i][j] + down_bias[shard_expert * d_model + col];
            }
        }
    }
}
