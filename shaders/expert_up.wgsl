// expert_up: the up-projection of every expert in ONE dispatch (a grouped matmul).
// H[slot, f] = act(x[slot_token[slot]]·W1[e, f] + b1[e, f])
//              (⊙ (x[slot_token[slot]]·W3[e, f] + b3[e, f]) when GATED)
// for every kept slot, where e is the expert owning the slot's row tile.
//
// Dispatch (indirect, arguments from scan_expert_offsets): x = column tiles of F,
// y = the row tiles of this weight shard's experts. A workgroup of LANES invocations is laid
// out ROW_LANES × (LANES / ROW_LANES); each invocation keeps a BLOCK_ROWS × BLOCK output
// block (BLOCK_ROWS = 4·ROW_QUADS, BLOCK = 4·QUADS) in registers as 4×4 matrices, so a
// tile is BLOCK_ROWS·ROW_LANES rows by BLOCK·LANES / ROW_LANES columns. The host picks
// QUADS per adapter (2 with 64 lanes on GPUs; 4 with 16 lanes on CPU adapters, where every
// storage load is a loop over the SIMD lanes and only a bigger block feeds more FMAs per
// load), and ROW_LANES and ROW_QUADS from the tokens per expert.
// Operands are read as vec4s along k from texture arrays: the weights (one layer per expert
// in quads of rows, in their stored format, decoded by weight_quad of expert_matmul.wgsl,
// which the shader registry prepends to this file; zero-padded) and x (its rows as
// stage_tokens wrote them, zero-padded, token t at row t % height of layer t / height). On CPU adapters a texel fetch is a vector gather while
// a storage load is a loop over the SIMD lanes; GPUs read them through the texture cache.
// The row gather x[slot_token[...]] happens in the operand loads: no permuted copy of x.
// `hidden` rows are F rounded up to a multiple of 4 long; the padding columns get zeros, so
// expert_down reads them as vec4s too.
// Bindings: 0 params, 1 x_rows texels [layers][height][D4 / 4], 2 slot_token [slots],
// 3 expert_table, 4-6 w1's quants, high bits and scales ([shard experts][F4 / 4][...], see
// expert_matmul.wgsl), 7-9 w3's likewise (dummies unless GATED), 10 up_bias
// [shard experts, F4] b1, then [shard experts, F4] b3 when GATED, 11 hidden [slots, F4]; D4 and
// F4 are D and F rounded up to a multiple of 4; 12 pre_activations [slots][F4] a, each
// followed by its v when GATED, written only when KEEP_PRE_ACTIVATIONS (a trainable
// layer's forward keeps them for expert_hidden_backward; a 1-float dummy otherwise),
// 13 slot_gate [slots]: with GATE_INPUT (gate_on: input) each slot's projections are
// multiplied by its gate before the biases, W1·(g·x) = g·(W1·x) (scatter_assignments
// writes it; read only then).

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

override GATED: bool = false;
// The stored formats of W1 and W3 (codes of expert_matmul.wgsl).
override W1_FORMAT: u32 = 0u;
override W3_FORMAT: u32 = 0u;
// Lanes along the rows of a tile: 1, 2, 4 or 8.
override ROW_LANES: u32 = 2u;
// 4×4 matrices along the columns of an invocation's block: 2 or 4.
override QUADS: u32 = 2u;
// 4×4 matrices along its rows: 1, 2 or 4 (fewer than QUADS for experts with few tokens,
// whose row tiles would otherwise be mostly padding).
override ROW_QUADS: u32 = 2u;
// Invocations per workgroup: 64 with QUADS 2, 16 with QUADS 4 (tiles of a similar size).
override LANES: u32 = 64u;
// Whether the pre-activations a (and v) are stored too (trainable layers).
override KEEP_PRE_ACTIVATIONS: bool = false;
// Whether the gate multiplies the expert's input (Llama 4) rather than its output.
override GATE_INPUT: bool = false;

@group(0) @binding(0) var<uniform> params: ExpertParams;
@group(0) @binding(1) var x_rows: texture_2d_array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var w1_quants: texture_2d_array<u32>;
@group(0) @binding(5) var w1_high: texture_2d_array<u32>;
@group(0) @binding(6) var w1_scales: texture_2d_array<u32>;
@group(0) @binding(7) var w3_quants: texture_2d_array<u32>;
@group(0) @binding(8) var w3_high: texture_2d_array<u32>;
@group(0) @binding(9) var w3_scales: texture_2d_array<u32>;
@group(0) @binding(10) var<storage, read> up_bias: array<f32>;
@group(0) @binding(11) var<storage, read_write> hidden: array<f32>;
@group(0) @binding(12) var<storage, read_write> pre_activations: array<f32>;
@group(0) @binding(13) var<storage, read> slot_gate: array<f32>;

// Four x rows (texture rows `rows` of layers `layers`) at texel k4, transposed: row i of the
// result is x row i.
fn x_quad(rows: vec4<u32>, layers: vec4<u32>, k4: u32) -> mat4x4<f32> {
    return transpose(mat4x4(textureLoad(x_rows, vec2(k4, rows.x), layers.x, 0),
        textureLoad(x_rows, vec2(k4, rows.y), layers.y, 0),
        textureLoad(x_rows, vec2(k4, rows.z), layers.z, 0),
        textureLoad(x_rows, vec2(k4, rows.w), layers.w, 0)));
}

// Weight rows 4·quad .. 4·quad + 4 of expert layer `layer` at k4 (floats 4·k4 .. 4·k4 + 4):
// column j of the result is row 4·quad + j.
fn w1_quad(quad: u32, layer: u32, k4: u32, scales: QuadScales) -> mat4x4<f32> {
    return weight_quad(W1_FORMAT, w1_quants, w1_high, scales, quad, layer, k4);
}

fn w3_quad(quad: u32, layer: u32, k4: u32, scales: QuadScales) -> mat4x4<f32> {
    return weight_quad(W3_FORMAT, w3_quants, w3_high, scales, quad, layer, k4);
}

// Writes one 4×4 quad at (row, col): bias, activation and gate; padding columns F..F4 get
// zeros, rows past the expert's end and columns past F4 nothing.
fn store_quad(up: mat4x4<f32>, gate: mat4x4<f32>, row: u32, col: u32, rows_end: u32, bias_at: u32) {
    let d_ff = params.d_ff;
    let f_stride = (d_ff + 3u) / 4u * 4u;
    let gate_bias_at = params.shard_num_experts * f_stride;
    for (var r = 0u; r < 4u; r++) {
        let slot = row + r;
        if (slot >= rows_end) {
            break;
        }
        var input_scale = 1.0;
        if (GATE_INPUT) {
            input_scale = slot_gate[slot];
        }
        for (var c = 0u; c < 4u; c++) {
            let column = col + c;
            if (column < d_ff) {
                let a = input_scale * up[c][r] + up_bias[bias_at + column];
                var h = activate(a);
                if (GATED) {
                    let v = input_scale * gate[c][r] + up_bias[gate_bias_at + bias_at + column];
                    h *= gate_value(v);
                    if (KEEP_PRE_ACTIVATIONS) {
                        pre_activations[(2u * slot + 1u) * f_stride + column] = v;
                    }
                }
                if (KEEP_PRE_ACTIVATIONS) {
                    let stride = select(1u, 2u, GATED) * f_stride;
                    pre_activations[slot * stride + column] = a;
                }
                hidden[slot * f_stride + column] = h;
            } else if (column < f_stride) {
                hidden[slot * f_stride + column] = 0.0;
            }
        }
    }
}

// Writes one row quad of the block: its QUADS quads at columns col, col + 4, ...
fn store_row(
    up0: mat4x4<f32>, up1: mat4x4<f32>, up2: mat4x4<f32>, up3: mat4x4<f32>,
    gate0: mat4x4<f32>, gate1: mat4x4<f32>, gate2: mat4x4<f32>, gate3: mat4x4<f32>,
    row: u32, col: u32, rows_end: u32, bias_at: u32,
) {
    store_quad(up0, gate0, row, col, rows_end, bias_at);
    store_quad(up1, gate1, row, col + 4u, rows_end, bias_at);
    if (QUADS == 4u) {
        store_quad(up2, gate2, row, col + 8u, rows_end, bias_at);
        store_quad(up3, gate3, row, col + 12u, rows_end, bias_at);
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
    let d4 = (d_model + 3u) / 4u;

    // Padding rows read token 0 and column quads past F re-read the last one (its rows past
    // F are zeros): the loop below then needs no bounds checks, and the store skips them. Token t's x row is texture row
    // t % height of layer t / height.
    let height = textureDimensions(x_rows).y;
    var x_tokens: array<vec4<u32>, 4>;
    for (var q = 0u; q < ROW_QUADS; q++) {
        let slots = vec4(row0 + 4u * q) + vec4(0u, 1u, 2u, 3u);
        let tokens = vec4(slot_token[slots.x], slot_token[slots.y], slot_token[slots.z], slot_token[slots.w]);
        x_tokens[q] = select(vec4(0u), tokens, slots < vec4(rows_end));
    }
    let xr0 = x_tokens[0] % height;
    let xl0 = x_tokens[0] / height;
    let xr1 = x_tokens[1] % height;
    let xl1 = x_tokens[1] / height;
    let xr2 = x_tokens[2] % height;
    let xl2 = x_tokens[2] / height;
    let xr3 = x_tokens[3] % height;
    let xl3 = x_tokens[3] / height;
    let last_quad = (d_ff + 3u) / 4u - 1u;
    let wr0 = min(col0 / 4u, last_quad);
    let wr1 = min(col0 / 4u + 1u, last_quad);
    let wr2 = min(col0 / 4u + 2u, last_quad);
    let wr3 = min(col0 / 4u + 3u, last_quad);

    // up_rc and gate_rc: rows 4r.., columns 4c.. of the block.
    var up00: mat4x4<f32>; var up01: mat4x4<f32>; var up02: mat4x4<f32>; var up03: mat4x4<f32>;
    var up10: mat4x4<f32>; var up11: mat4x4<f32>; var up12: mat4x4<f32>; var up13: mat4x4<f32>;
    var up20: mat4x4<f32>; var up21: mat4x4<f32>; var up22: mat4x4<f32>; var up23: mat4x4<f32>;
    var up30: mat4x4<f32>; var up31: mat4x4<f32>; var up32: mat4x4<f32>; var up33: mat4x4<f32>;
    var gate00: mat4x4<f32>; var gate01: mat4x4<f32>; var gate02: mat4x4<f32>; var gate03: mat4x4<f32>;
    var gate10: mat4x4<f32>; var gate11: mat4x4<f32>; var gate12: mat4x4<f32>; var gate13: mat4x4<f32>;
    var gate20: mat4x4<f32>; var gate21: mat4x4<f32>; var gate22: mat4x4<f32>; var gate23: mat4x4<f32>;
    var gate30: mat4x4<f32>; var gate31: mat4x4<f32>; var gate32: mat4x4<f32>; var gate33: mat4x4<f32>;
    // A quad's scales change every 32 values: decoded then, not at every step.
    var s10: QuadScales; var s11: QuadScales; var s12: QuadScales; var s13: QuadScales;
    var s30: QuadScales; var s31: QuadScales; var s32: QuadScales; var s33: QuadScales;
    for (var k4 = 0u; k4 < d4; k4++) {
        if (has_block_scales(W1_FORMAT, W3_FORMAT) && k4 % 8u == 0u) {
            s10 = quad_scales(W1_FORMAT, w1_scales, wr0, shard_expert, k4);
            s11 = quad_scales(W1_FORMAT, w1_scales, wr1, shard_expert, k4);
            if (QUADS == 4u) {
                s12 = quad_scales(W1_FORMAT, w1_scales, wr2, shard_expert, k4);
                s13 = quad_scales(W1_FORMAT, w1_scales, wr3, shard_expert, k4);
            }
            if (GATED) {
                s30 = quad_scales(W3_FORMAT, w3_scales, wr0, shard_expert, k4);
                s31 = quad_scales(W3_FORMAT, w3_scales, wr1, shard_expert, k4);
                if (QUADS == 4u) {
                    s32 = quad_scales(W3_FORMAT, w3_scales, wr2, shard_expert, k4);
                    s33 = quad_scales(W3_FORMAT, w3_scales, wr3, shard_expert, k4);
                }
            }
        }
        var w0 = w1_quad(wr0, shard_expert, k4, s10);
        var w1q = w1_quad(wr1, shard_expert, k4, s11);
        var w2q: mat4x4<f32>;
        var w3q: mat4x4<f32>;
        if (QUADS == 4u) {
            w2q = w1_quad(wr2, shard_expert, k4, s12);
            w3q = w1_quad(wr3, shard_expert, k4, s13);
        }
        let xt0 = x_quad(xr0, xl0, k4);
        var xt1: mat4x4<f32>;
        var xt2: mat4x4<f32>;
        var xt3: mat4x4<f32>;
        accumulate(&up00, &up01, &up02, &up03, xt0, w0, w1q, w2q, w3q);
        if (ROW_QUADS >= 2u) {
            xt1 = x_quad(xr1, xl1, k4);
            accumulate(&up10, &up11, &up12, &up13, xt1, w0, w1q, w2q, w3q);
        }
        if (ROW_QUADS == 4u) {
            xt2 = x_quad(xr2, xl2, k4);
            xt3 = x_quad(xr3, xl3, k4);
            accumulate(&up20, &up21, &up22, &up23, xt2, w0, w1q, w2q, w3q);
            accumulate(&up30, &up31, &up32, &up33, xt3, w0, w1q, w2q, w3q);
        }
        if (GATED) {
            w0 = w3_quad(wr0, shard_expert, k4, s30);
            w1q = w3_quad(wr1, shard_expert, k4, s31);
            if (QUADS == 4u) {
                w2q = w3_quad(wr2, shard_expert, k4, s32);
                w3q = w3_quad(wr3, shard_expert, k4, s33);
            }
            accumulate(&gate00, &gate01, &gate02, &gate03, xt0, w0, w1q, w2q, w3q);
            if (ROW_QUADS >= 2u) {
                accumulate(&gate10, &gate11, &gate12, &gate13, xt1, w0, w1q, w2q, w3q);
            }
            if (ROW_QUADS == 4u) {
                accumulate(&gate20, &gate21, &gate22, &gate23, xt2, w0, w1q, w2q, w3q);
                accumulate(&gate30, &gate31, &gate32, &gate33, xt3, w0, w1q, w2q, w3q);
            }
        }
    }

    let bias_at = shard_expert * ((d_ff + 3u) / 4u * 4u);
    store_row(up00, up01, up02, up03, gate00, gate01, gate02, gate03,
        row0, col0, rows_end, bias_at);
    if (ROW_QUADS >= 2u) {
        store_row(up10, up11, up12, up13, gate10, gate11, gate12, gate13,
            row0 + 4u, col0, rows_end, bias_at);
    }
    if (ROW_QUADS == 4u) {
        store_row(up20, up21, up22, up23, gate20, gate21, gate22, gate23,
            row0 + 8u, col0, rows_end, bias_at);
        store_row(up30, up31, up32, up33, gate30, gate31, gate32, gate33,
            row0 + 12u, col0, rows_end, bias_at);
    }
}
