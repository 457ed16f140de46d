// grouped_matmul: the register-blocked matmul core of the backward's GEMMs (the shader
// registry prepends it to each; naga validates every combination). An invocation owns a
// BLOCK_ROWS × BLOCK block of C = A·Bᵀ (BLOCK_ROWS = 4·ROW_QUADS, BLOCK = 4·QUADS), kept
// in registers as 4×4 matrices; a workgroup of LANES invocations lays them out ROW_LANES ×
// (LANES / ROW_LANES), so a tile is BLOCK_ROWS·ROW_LANES rows by BLOCK·LANES / ROW_LANES
// columns, as in the forward's expert_up and expert_down (same overrides, same tilings).
// Along k it steps four values at a time; every sum runs in k order, the same bits on every
// run.
//
// The kernel that includes this file says where its operands come from, for its
// invocation's block (row and column quads are counted within the block):
//   fn prepare_k(k4: u32)                             what every quad at k4 shares (the
//                                                     slots of a weight gradient's step)
//   fn a_quad(row_quad: u32, k4: u32) -> mat4x4<f32>   result[c][r] = A(row 4·row_quad + r,
//                                                       k 4·k4 + c)
//   fn b_quad(col_quad: u32, k4: u32) -> mat4x4<f32>   result[j][c] = B(column
//                                                       4·col_quad + j, k 4·k4 + c)
//   fn store_quad(value: mat4x4<f32>, row_quad: u32, col_quad: u32)
//                                                     value[j][r] = C(row r, column j)
// then calls `multiply` over its k range and `store_block`.

// Lanes along the rows of a tile: 1, 2, 4 or 8.
override ROW_LANES: u32 = 2u;
// 4×4 matrices along the columns of an invocation's block: 2 or 4.
override QUADS: u32 = 2u;
// 4×4 matrices along its rows: 1, 2 or 4.
override ROW_QUADS: u32 = 2u;
// Invocations per workgroup: 64 with QUADS 2, 16 with QUADS 4.
override LANES: u32 = 64u;

// One row quad of a block: its QUADS column quads.
struct BlockRow {
    c0: mat4x4<f32>,
    c1: mat4x4<f32>,
    c2: mat4x4<f32>,
    c3: mat4x4<f32>,
}

// An invocation's block: its ROW_QUADS row quads.
struct Block {
    r0: BlockRow,
    r1: BlockRow,
    r2: BlockRow,
    r3: BlockRow,
}

// B's QUADS column quads at one k4, loaded once for every row quad.
struct ColumnQuads {
    q0: mat4x4<f32>,
    q1: mat4x4<f32>,
    q2: mat4x4<f32>,
    q3: mat4x4<f32>,
}

// `row` + a·b. Rows pass by value: naga cannot yet pass a pointer to a struct member.
fn accumulate_row(row: BlockRow, a: mat4x4<f32>, b: ColumnQuads) -> BlockRow {
    var sum = row;
    sum.c0 += a * b.q0;
    sum.c1 += a * b.q1;
    if (QUADS == 4u) {
        sum.c2 += a * b.q2;
        sum.c3 += a * b.q3;
    }
    return sum;
}

fn column_quads(k4: u32) -> ColumnQuads {
    var b: ColumnQuads;
    b.q0 = b_quad(0u, k4);
    b.q1 = b_quad(1u, k4);
    if (QUADS == 4u) {
        b.q2 = b_quad(2u, k4);
        b.q3 = b_quad(3u, k4);
    }
    return b;
}

// block += A·Bᵀ over k = 4·k4_begin .. 4·k4_end.
fn multiply(block: ptr<function, Block>, k4_begin: u32, k4_end: u32) {
    for (var k4 = k4_begin; k4 < k4_end; k4++) {
        prepare_k(k4);
        let b = column_quads(k4);
        (*block).r0 = accumulate_row((*block).r0, a_quad(0u, k4), b);
        if (ROW_QUADS >= 2u) {
            (*block).r1 = accumulate_row((*block).r1, a_quad(1u, k4), b);
        }
        if (ROW_QUADS == 4u) {
            (*block).r2 = accumulate_row((*block).r2, a_quad(2u, k4), b);
            (*block).r3 = accumulate_row((*block).r3, a_quad(3u, k4), b);
        }
    }
}

fn store_row(row: BlockRow, row_quad: u32) {
    store_quad(row.c0, row_quad, 0u);
    store_quad(row.c1, row_quad, 1u);
    if (QUADS == 4u) {
        store_quad(row.c2, row_quad, 2u);
        store_quad(row.c3, row_quad, 3u);
    }
}

fn store_block(block: Block) {
    store_row(block.r0, 0u);
    if (ROW_QUADS >= 2u) {
        store_row(block.r1, 1u);
    }
    if (ROW_QUADS == 4u) {
        store_row(block.r2, 2u);
        store_row(block.r3, 3u);
    }
}

// Where an invocation's block sits in its tile: (first row, first column).
fn block_origin(tile_row: u32, tile_col: u32, lane: u32) -> vec2<u32> {
    let col_lanes = LANES / ROW_LANES;
    let row_tile = ROW_LANES * 4u * ROW_QUADS;
    let col_tile = col_lanes * 4u * QUADS;
    return vec2(tile_row * row_tile + (lane / col_lanes) * 4u * ROW_QUADS,
        tile_col * col_tile + (lane % col_lanes) * 4u * QUADS);
}

// An f32 weight tensor's texture (see expert_matmul.wgsl: texel (4·k4 + j, q) holds row
// 4q + j at k = 4·k4 .. 4·k4 + 4) read TRANSPOSED, as the backward needs it: columns
// 4·col4 .. 4·col4 + 4 of the stored rows 4·row4 .. 4·row4 + 4, as b_quad returns them with
// the stored columns as output columns and the stored rows as k (result[j][c] = W[row 4·row4
// + c, column 4·col4 + j]).
fn transposed_quad(quants: texture_2d_array<u32>, col4: u32, row4: u32, layer: u32) -> mat4x4<f32> {
    return transpose(mat4x4(bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * col4, row4), layer, 0)),
        bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * col4 + 1u, row4), layer, 0)),
        bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * col4 + 2u, row4), layer, 0)),
        bitcast<vec4<f32>>(textureLoad(quants, vec2(4u * col4 + 3u, row4), layer, 0))));
}
