// expert_down: the down-projection of every expert in ONE dispatch (a grouped matmul).
// O[slot, d] = H[slot]·W2[e, d] + b2[e, d] for every kept slot, where e is the expert
// owning the slot's row tile.
//
// Dispatch (indirect, arguments from scan_expert_offsets): x = column tiles of D,
// y = the row tiles of this weight shard's experts. The same tiling as expert_up: LANES
// invocations laid out ROW_LANES × (LANES / ROW_LANES), a BLOCK_ROWS × BLOCK block of 4×4
// matrices each; operands read as vec4s along k (hidden rows are F4 long; W2 is texture
// arrays in quads of rows like expert_up's weights, in its stored format, decoded by
// weight_quad of expert_matmul.wgsl, which the shader registry prepends, with the
// accumulate both K loops use; keep this loop in step with expert_up's).
// Bindings: 0 params, 1 hidden [slots, F4], 2 expert_table, 3-5 w2's quants, high bits and
// scales ([shard experts][D4 / 4][...]), 6 down_bias [shard experts, D4],
// 7 expert_out [slots, D]; D4 and F4 are D and F rounded up to a multiple of 4.

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
// 4×4 matrices along the columns of an invocation's block: 2 or 4 (as in expert_up).
override QUADS: u32 = 2u;
// 4×4 matrices along its rows: 1, 2 or 4 (as in expert_up).
override ROW_QUADS: u32 = 2u;
// Invocations per workgroup: 64 with QUADS 2, 16 with QUADS 4 (as in expert_up).
override LANES: u32 = 64u;
// The stored format of W2 (a code of expert_matmul.wgsl).
override W2_FORMAT: u32 = 0u;


@group(0) @binding(0) var<uniform> params: ExpertParams;
@group(0) @binding(1) var<storage, read> hidden: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> expert_table: array<u32>;
@group(0) @binding(3) var w2_quants: texture_2d_array<u32>;
@group(0) @binding(4) var w2_high: texture_2d_array<u32>;
@group(0) @binding(5) var w2_scales: texture_2d_array<u32>;
@group(0) @binding(6) var<storage, read> down_bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> expert_out: array<f32>;

// Four hidden rows (vec4 offsets `rows`) at vec4 k4, transposed: row i is hidden row i.
fn hidden_quad(rows: vec4<u32>, k4: u32) -> mat4x4<f32> {
    return transpose(mat4x4(hidden[rows.x + k4], hidden[rows.y + k4], hidden[rows.z + k4],
        hidden[rows.w + k4]));
}

// Weight rows 4·quad .. 4·quad + 4 of expert layer `layer` at k4 (floats 4·k4 .. 4·k4 + 4):
// column j of the result is row 4·quad + j.
fn w2_quad(quad: u32, layer: u32, k4: u32, scales: QuadScales) -> mat4x4<f32> {
    return weight_quad(W2_FORMAT, w2_quants, w2_high, scales, quad, layer, k4);
}

// Writes one 4×4 quad at (row, col) plus the bias; rows past the expert's end and columns
// past D are skipped.
fn store_quad(out: mat4x4<f32>, row: u32, col: u32, rows_end: u32, bias_at: u32) {
    let d_model = params.d_model;
    for (var r = 0u; r < 4u; r++) {
        let slot = row + r;
        if (slot >= rows_end) {
            break;
        }
        for (var c = 0u; c < 4u; c++) {
            let column = col + c;
            if (column < d_model) {
                expert_out[slot * d_model + column] = out[c][r] + down_bias[bias_at + column];
            }
        }
    }
}

// Writes one row quad of the block: its QUADS quads at columns col, col + 4, ...
fn store_row(
    out0: mat4x4<f32>, out1: mat4x4<f32>, out2: mat4x4<f32>, out3: mat4x4<f32>,
    row: u32, col: u32, rows_end: u32, bias_at: u32,
) {
    store_quad(out0, row, col, rows_end, bias_at);
    store_quad(out1, row, col + 4u, rows_end, bias_at);
    if (QUADS == 4u) {
        store_quad(out2, row, col + 8u, rows_end, bias_at);
        store_quad(out3, row, col + 12u, rows_end, bias_at);
    }
}

@compute @workgroup_size(LANES)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let d_model = params.d_model;
    let d_ff = params.d_ff;
    let num_experts = params.num_experts;
    let tile_start_at = 2u * num_experts;
    let tile_expert_at = 3u * num_experts + 2u;
    let block = 4u * QUADS;
    let block_rows = 4u * ROW_QUADS;
    let row_tile = ROW_LANES * block_rows;
    let col_lanes = LANES / ROW_LANES;

    let tile = expert_table[tile_start_at + params.shard_first_expert] + workgroup_id.y;
    let expert = expert_table[tile_expert_at + tile];
    let shard_expert = expert - params.shard_first_expert;
    let rows_end = expert_table[tile_start_at + expert] * row_tile + expert_table[num_experts + expert];

    let row0 = tile * row_tile + (lane / col_lanes) * block_rows;
    let col0 = (workgroup_id.x * col_lanes + lane % col_lanes) * block;
    let f4 = (d_ff + 3u) / 4u;

    // Padding rows exist in `hidden` (it holds whole row tiles) and are never stored;
    // column quads past D re-read the last one so the loop needs no bounds checks.
    var h_rows: array<vec4<u32>, 4>;
    for (var q = 0u; q < 4u; q++) {
        h_rows[q] = (vec4(row0 + 4u * q) + vec4(0u, 1u, 2u, 3u)) * f4;
    }
    let hr0 = h_rows[0];
    let hr1 = h_rows[1];
    let hr2 = h_rows[2];
    let hr3 = h_rows[3];
    let last_quad = (d_model + 3u) / 4u - 1u;
    let wr0 = min(col0 / 4u, last_quad);
    let wr1 = min(col0 / 4u + 1u, last_quad);
    let wr2 = min(col0 / 4u + 2u, last_quad);
    let wr3 = min(col0 / 4u + 3u, last_quad);

    // out_rc: rows 4r.., columns 4c.. of the block.
    var out00: mat4x4<f32>; var out01: mat4x4<f32>; var out02: mat4x4<f32>; var out03: mat4x4<f32>;
    var out10: mat4x4<f32>; var out11: mat4x4<f32>; var out12: mat4x4<f32>; var out13: mat4x4<f32>;
    var out20: mat4x4<f32>; var out21: mat4x4<f32>; var out22: mat4x4<f32>; var out23: mat4x4<f32>;
    var out30: mat4x4<f32>; var out31: mat4x4<f32>; var out32: mat4x4<f32>; var out33: mat4x4<f32>;
    // A quad's scales change every 32 values: decoded then, not at every step.
    var s0: QuadScales; var s1: QuadScales; var s2: QuadScales; var s3: QuadScales;
    for (var k4 = 0u; k4 < f4; k4++) {
        if (has_block_scales(W2_FORMAT, W2_FORMAT) && k4 % 8u == 0u) {
            s0 = quad_scales(W2_FORMAT, w2_scales, wr0, shard_expert, k4);
            s1 = quad_scales(W2_FORMAT, w2_scales, wr1, shard_expert, k4);
            if (QUADS == 4u) {
                s2 = quad_scales(W2_FORMAT, w2_scales, wr2, shard_expert, k4);
                s3 = quad_scales(W2_FORMAT, w2_scales, wr3, shard_expert, k4);
            }
        }
        let w0 = w2_quad(wr0, shard_expert, k4, s0);
        let w1 = w2_quad(wr1, shard_expert, k4, s1);
        var w2q: mat4x4<f32>;
        var w3: mat4x4<f32>;
        if (QUADS == 4u) {
            w2q = w2_quad(wr2, shard_expert, k4, s2);
            w3 = w2_quad(wr3, shard_expert, k4, s3);
        }
        accumulate(&out00, &out01, &out02, &out03, hidden_quad(hr0, k4), w0, w1, w2q, w3);
        if (ROW_QUADS >= 2u) {
            accumulate(&out10, &out11, &out12, &out13, hidden_quad(hr1, k4), w0, w1, w2q, w3);
        }
        if (ROW_QUADS == 4u) {
            accumulate(&out20, &out21, &out22, &out23, hidden_quad(hr2, k4), w0, w1, w2q, w3);
            accumulate(&out30, &out31, &out32, &out33, hidden_quad(hr3, k4), w0, w1, w2q, w3);
        }
    }

    let bias_at = shard_expert * ((d_model + 3u) / 4u * 4u);
    store_row(out00, out01, out02, out03, row0, col0, rows_end, bias_at);
    if (ROW_QUADS >= 2u) {
        store_row(out10, out11, out12, out13, row0 + 4u, col0, rows_end, bias_at);
    }
    if (ROW_QUADS == 4u) {
        store_row(out20, out21, out22, out23, row0 + 8u, col0, rows_end, bias_at);
        store_row(out30, out31, out32, out33, row0 + 12u, col0, rows_end, bias_at);
    }
}
