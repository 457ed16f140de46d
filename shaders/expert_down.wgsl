// expert_down: the down-projection of every expert in ONE dispatch (a grouped matmul).
// O[slot, d] = H[slot]·W2[e, d] + b2[e, d] for every kept slot, where e is the expert
// owning the slot's row tile.
//
// Dispatch (indirect, arguments from scan_expert_offsets): x = column tiles of D,
// y = the row tiles of this weight shard's experts. The same tiling as expert_up: 64
// invocations laid out ROW_LANES × (64 / ROW_LANES), an 8×8 register block each. The
// K loop mirrors expert_up's (WGSL has no includes; keep the two in step).
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

// Lanes along the rows of a tile: 1, 2, 4 or 8 (as in expert_up).
override ROW_LANES: u32 = 2u;

const LANES: u32 = 64u;
const BLOCK: u32 = 8u;

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

    // Padding rows exist in `hidden` (it holds whole row tiles) and are never stored;
    // columns past D re-read column D-1 so the loop needs no bounds checks.
    var h_base: array<u32, 8>;
    var w_base: array<u32, 8>;
    for (var i = 0u; i < BLOCK; i++) {
        h_base[i] = (row0 + i) * d_ff;
        w_base[i] = (shard_expert * d_model + min(col0 + i, d_model - 1u)) * d_ff;
    }

    var acc: array<vec4<f32>, 16>;
    var a: array<vec4<f32>, 8>;
    var b: array<vec4<f32>, 8>;
    var k = 0u;
    for (; k + 4u <= d_ff; k += 4u) {
        let b0 = w2_4(w_base[0] + k);
        let b1 = w2_4(w_base[1] + k);
        let b2 = w2_4(w_base[2] + k);
        let b3 = w2_4(w_base[3] + k);
        let b4 = w2_4(w_base[4] + k);
        let b5 = w2_4(w_base[5] + k);
        let b6 = w2_4(w_base[6] + k);
        let b7 = w2_4(w_base[7] + k);
        let lo0 = vec4(b0.x, b1.x, b2.x, b3.x);
        let lo1 = vec4(b0.y, b1.y, b2.y, b3.y);
        let lo2 = vec4(b0.z, b1.z, b2.z, b3.z);
        let lo3 = vec4(b0.w, b1.w, b2.w, b3.w);
        let hi0 = vec4(b4.x, b5.x, b6.x, b7.x);
        let hi1 = vec4(b4.y, b5.y, b6.y, b7.y);
        let hi2 = vec4(b4.z, b5.z, b6.z, b7.z);
        let hi3 = vec4(b4.w, b5.w, b6.w, b7.w);
        for (var i = 0u; i < BLOCK; i++) {
            let av = hidden4(h_base[i] + k);
            acc[2u * i] += av.x * lo0 + av.y * lo1 + av.z * lo2 + av.w * lo3;
            acc[2u * i + 1u] += av.x * hi0 + av.y * hi1 + av.z * hi2 + av.w * hi3;
        }
    }
    // The last d_ff % 4 columns, zero-padded into one more step.
    let rest = d_ff - k;
    if (rest > 0u) {
        for (var i = 0u; i < BLOCK; i++) {
            a[i] = vec4(0.0);
            b[i] = vec4(0.0);
            for (var kk = 0u; kk < rest; kk++) {
                a[i][kk] = hidden[h_base[i] + k + kk];
                b[i][kk] = w2[w_base[i] + k + kk];
            }
        }
        accumulate(&acc, &a, &b);
    }

    for (var i = 0u; i < BLOCK; i++) {
        let slot = row0 + i;
        if (slot >= rows_end) {
            break;
        }
        for (var j = 0u; j < BLOCK; j++) {
            let col = col0 + j;
            if (col < d_model) {
                expert_out[slot * d_model + col] = acc[2u * i + j / 4u][j % 4u] + down_bias[shard_expert * d_model + col];
            }
        }
    }
}
