// expert_up_backward: the up-projections' weight gradients as grouped transposed matmuls
// over each expert's own rows (no atomics):
//   dW1[e, f, d] = Σ_{slots of e} dA[slot, f]·x[t, d],   db1[e, f] = Σ dA[slot, f]
//   dW3, db3 likewise from dV (gated FFNs)
// in slot order: the same bits on every run. CPU twin: the dW1/db1/dW3/db3 sums of
// cpu_backward::backward.
//
// Dispatch: one invocation per element of [projections, N, F, D + 1] (d = D is the bias;
// projections 2 when gated: W1 then W3), workgroups of 64 in 2-D.
// Bindings: 0 params, 1 x [T, D], 2 slot_token [slots], 3 expert_table, 4 d_a [slots, F],
// 5 d_v [slots, F], 6 gradients.

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var<storage, read> d_a: array<f32>;
@group(0) @binding(5) var<storage, read> d_v: array<f32>;
@group(0) @binding(6) var<storage, read_write> gradients: array<f32>;

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
    let columns = d_model + 1u;
    let per_projection = n * d_ff * columns;
    let projections = select(1u, 2u, params.gated != 0u);
    if (index >= projections * per_projection) {
        return;
    }
    let is_w3 = index >= per_projection;
    let within = index % per_projection;
    let e = within / (d_ff * columns);
    let f = within / columns % d_ff;
    let d = within % columns;
    let is_bias = d == d_model;
    let bias_at = select(params.b1_at, params.b3_at, is_w3);
    if (is_bias && bias_at == ABSENT) {
        return;
    }
    let first = expert_table[2u * n + e] * params.row_tile;
    let rows = expert_table[n + e];
    var sum = 0.0;
    for (var r = 0u; r < rows; r++) {
        let slot = first + r;
        var d_pre: f32;
        if (is_w3) {
            d_pre = d_v[slot * d_ff + f];
        } else {
            d_pre = d_a[slot * d_ff + f];
        }
        if (is_bias) {
            sum += d_pre;
        } else {
            sum += d_pre * x[slot_token[slot] * d_model + d];
        }
    }
    if (is_bias) {
        gradients[bias_at + e * d_ff + f] = sum;
    } else {
        let matrix_at = select(params.w1_at, params.w3_at, is_w3);
        gradients[matrix_at + (e * d_ff + f) * d_model + d] = sum;
    }
}
