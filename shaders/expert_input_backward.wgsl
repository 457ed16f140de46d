// expert_input_backward: per kept slot, the gradient of the expert's input row through the
// transposed up-projections:
//   dXslot[slot, d] = Σ_f dA[slot, f]·W1[e, f, d] (+ Σ_f dV[slot, f]·W3[e, f, d] when gated)
// in f order, W1's terms before W3's; combine_backward gathers the slots of each token.
// Padding slots get zeros. CPU twin: cpu_backward_kernels::expert_input_backward.
//
// Dispatch: one invocation per block of 4 slots × 4 columns of D, workgroups of 64 in 2-D.
// The 4 slots of a block lie in one row tile, so one expert holds them all. Per unit of F
// a block loads 4 values of dA (dV) and 4 of the weight row for its 16 multiply-adds.
// Loads past a tensor's edge feed only values that are not written.
// Bindings: 0 params, 1 expert_table, 2 d_a [slots, F], 3 d_v [slots, F], 4 parameters,
// 5 d_x_slot [slots, D].

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> expert_table: array<u32>;
@group(0) @binding(2) var<storage, read> d_a: array<f32>;
@group(0) @binding(3) var<storage, read> d_v: array<f32>;
@group(0) @binding(4) var<storage, read> parameters: array<f32>;
@group(0) @binding(5) var<storage, read_write> d_x_slot: array<f32>;

// Unit f of the pre-activation gradients of slots slot0 .. slot0 + 4 (dV's or dA's).
fn d_pre4(of_w3: bool, slot0: u32, f: u32) -> vec4<f32> {
    let d_ff = params.d_ff;
    let at = slot0 * d_ff + f;
    if (of_w3) {
        return vec4(d_v[at], d_v[at + d_ff], d_v[at + 2u * d_ff], d_v[at + 3u * d_ff]);
    }
    return vec4(d_a[at], d_a[at + d_ff], d_a[at + 2u * d_ff], d_a[at + 3u * d_ff]);
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = linear_index(workgroup_id, num_workgroups, lane);
    let d_model = params.d_model;
    let column_blocks = (d_model + 3u) / 4u;
    if (index >= params.max_slots / 4u * column_blocks) {
        return;
    }
    let slot0 = index / column_blocks * 4u;
    let d0 = index % column_blocks * 4u;
    let block = slot_block(slot0);
    let valid = block.valid;
    let e = block.expert;
    // acc[i][c]: slot slot0 + i, column d0 + c.
    var acc = array<vec4<f32>, 4>();
    if (e != ABSENT) {
        let d_ff = params.d_ff;
        let projections = select(1u, 2u, params.gated != 0u);
        for (var p = 0u; p < projections; p++) {
            let of_w3 = p == 1u;
            let w_at = select(params.w1_at, params.w3_at, of_w3) + e * d_ff * d_model + d0;
            for (var f = 0u; f < d_ff; f++) {
                let g = d_pre4(of_w3, slot0, f);
                let row = w_at + f * d_model;
                let w = vec4(parameters[row], parameters[row + 1u], parameters[row + 2u],
                    parameters[row + 3u]);
                for (var i = 0u; i < 4u; i++) {
                    acc[i] += g[i] * w;
                }
            }
        }
    }
    for (var i = 0u; i < 4u; i++) {
        for (var c = 0u; c < 4u; c++) {
            if (d0 + c < d_model) {
                d_x_slot[(slot0 + i) * d_model + d0 + c] = select(0.0, acc[i][c], valid[i]);
            }
        }
    }
}
