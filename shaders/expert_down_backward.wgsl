// expert_down_backward: the down-projection's weight gradients as a grouped transposed
// matmul over each expert's own rows (no atomics; ScatterMoE's "XtY"):
//   dW2[e, d, f] = Σ_{slots of e} s·dy[t, d]·H[slot, f],   db2[e, d] = Σ s·dy[t, d]
// with H the hidden rows the training forward left in `hidden`. Each element's sum runs over
// the expert's slots in slot order: the same bits on every run. CPU twin: the dW2/db2 sums
// of cpu_backward::backward.
//
// Dispatch: one invocation per element of [N, D, F + 1] (f = F is db2), workgroups of 64
// in 2-D. Bindings: 0 params, 1 dy [T, D], 2 slot_token [slots], 3 expert_table,
// 4 slot_scale [slots], 5 hidden [slots, hidden_stride], 6 gradients.

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var<storage, read> slot_scale: array<f32>;
@group(0) @binding(5) var<storage, read> hidden: array<f32>;
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
    let columns = d_ff + 1u;
    if (index >= n * d_model * columns) {
        return;
    }
    let e = index / (d_model * columns);
    let d = index / columns % d_model;
    let f = index % columns;
    let is_bias = f == d_ff;
    if (is_bias && params.b2_at == ABSENT) {
        return;
    }
    let first = expert_table[2u * n + e] * params.row_tile;
    let rows = expert_table[n + e];
    var sum = 0.0;
    for (var r = 0u; r < rows; r++) {
        let slot = first + r;
        let d_out = slot_scale[slot] * dy[slot_token[slot] * d_model + d];
        if (is_bias) {
            sum += d_out;
        } else {
            sum += d_out * hidden[slot * params.hidden_stride + f];
        }
    }
    if (is_bias) {
        gradients[params.b2_at + e * d_model + d] = sum;
    } else {
        gradients[params.w2_at + (e * d_model + d) * d_ff + f] = sum;
    }
}
