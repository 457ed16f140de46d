// expert_up_backward: the up-projections' weight gradients as grouped transposed matmuls
// over each expert's own rows (no atomics):
//   dW1[e, f, d] = Σ_{slots of e} dA[slot, f]·x[t, d],   db1[e, f] = Σ dA[slot, f]
//   dW3, db3 likewise from dV (gated FFNs)
// in slot order: the same bits on every run. CPU twin: cpu_backward_kernels::
// expert_up_backward.
//
// Dispatch: one invocation per block of 4 rows of F × 4 columns of D of one expert and
// projection (the last column block holds the 4 biases; projections 2 when gated: W1 then
// W3), workgroups of 64 in 2-D. Per slot a block loads 4 values of dA (dV) and 4 of x for
// its 16 sums. Loads past a tensor's edge feed only sums that are not written.
// Bindings: 0 params, 1 x [T, D], 2 slot_token [slots], 3 expert_table, 4 d_a [slots, F],
// 5 d_v [slots, F], 6 gradients.

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var<storage, read> d_a: array<f32>;
@group(0) @binding(5) var<storage, read> d_v: array<f32>;
@group(0) @binding(6) var<storage, read_write> gradients: array<f32>;

// The pre-activation gradients of `slot` at f0 .. f0 + 4: dV's for W3, else dA's.
fn d_pre(is_w3: bool, slot: u32, f0: u32) -> vec4<f32> {
    let at = slot * params.d_ff + f0;
    if (is_w3) {
        return vec4(d_v[at], d_v[at + 1u], d_v[at + 2u], d_v[at + 3u]);
    }
    return vec4(d_a[at], d_a[at + 1u], d_a[at + 2u], d_a[at + 3u]);
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = linear_index(workgroup_id, num_workgroups, lane);
    let n = params.num_experts;
    let d_model = params.d_model;
    let d_ff = params.d_ff;
    let row_blocks = (d_ff + 3u) / 4u;
    let column_blocks = (d_model + 3u) / 4u + 1u;
    let per_projection = n * row_blocks * column_blocks;
    let projections = select(1u, 2u, params.gated != 0u);
    if (index >= projections * per_projection) {
        return;
    }
    let is_w3 = index >= per_projection;
    let within = index % per_projection;
    let e = within / (row_blocks * column_blocks);
    let f0 = within / column_blocks % row_blocks * 4u;
    let d0 = within % column_blocks * 4u;
    let is_bias = d0 >= d_model;
    let bias_at = select(params.b1_at, params.b3_at, is_w3);
    if (is_bias && bias_at == ABSENT) {
        return;
    }
    let first = expert_table[2u * n + e] * params.row_tile;
    let rows = expert_table[n + e];
    // acc[i][c]: row f0 + i, column d0 + c (biases: component 0).
    var acc = array<vec4<f32>, 4>();
    for (var r = 0u; r < rows; r++) {
        let slot = first + r;
        let g = d_pre(is_w3, slot, f0);
        var xs = vec4(1.0, 0.0, 0.0, 0.0);
        if (!is_bias) {
            let at = slot_token[slot] * d_model + d0;
            xs = vec4(x[at], x[at + 1u], x[at + 2u], x[at + 3u]);
        }
        for (var i = 0u; i < 4u; i++) {
            acc[i] += g[i] * xs;
        }
    }
    let matrix_at = select(params.w1_at, params.w3_at, is_w3);
    for (var i = 0u; i < 4u; i++) {
        let f = f0 + i;
        if (f >= d_ff) {
            break;
        }
        if (is_bias) {
            gradients[bias_at + e * d_ff + f] = acc[i].x;
            continue;
        }
        for (var c = 0u; c < 4u; c++) {
            if (d0 + c < d_model) {
                gradients[matrix_at + (e * d_ff + f) * d_model + d0 + c] = acc[i][c];
            }
        }
    }
}
