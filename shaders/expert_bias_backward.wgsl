// expert_bias_backward: the experts' bias gradients, each a sum over the expert's own kept
// slots in slot order (no atomics, the same bits on every run):
//   db1[e, f] = Σ dA[slot, f],   db3[e, f] = Σ dV[slot, f] (gated),   db2[e, d] = Σ s·dy[t, d]
// CPU twin: cpu_backward_kernels::expert_bias_backward.
//
// Dispatch: one invocation per expert and bias element (b1's F, b3's F, then b2's D),
// workgroups of 64 in 2-D; absent biases return at once.
// Bindings: 0 params, 1 dy [T, D], 2 slot_token [slots], 3 expert_table, 4 slot_scale
// [slots], 5 d_a [slots, F4], 6 d_v [slots, F4] (gated), 7 gradients.

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var<storage, read> slot_scale: array<f32>;
@group(0) @binding(5) var<storage, read> d_a: array<f32>;
@group(0) @binding(6) var<storage, read> d_v: array<f32>;
@group(0) @binding(7) var<storage, read_write> gradients: array<f32>;

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
    let per_expert = 2u * d_ff + d_model;
    if (index >= n * per_expert) {
        return;
    }
    let e = index / per_expert;
    let column = index % per_expert;
    let first = expert_table[2u * n + e] * params.row_tile;
    let rows = expert_table[n + e];
    var sum = 0.0;
    if (column < 2u * d_ff) {
        let of_b3 = column >= d_ff;
        let bias_at = select(params.b1_at, params.b3_at, of_b3);
        if (bias_at == ABSENT) {
            return;
        }
        let unit = column % d_ff;
        for (var r = 0u; r < rows; r++) {
            let at = (first + r) * params.hidden_stride + unit;
            if (of_b3) {
                sum += d_v[at];
            } else {
                sum += d_a[at];
            }
        }
        gradients[bias_at + e * d_ff + unit] = sum;
        return;
    }
    if (params.b2_at == ABSENT) {
        return;
    }
    let d = column - 2u * d_ff;
    for (var r = 0u; r < rows; r++) {
        let slot = first + r;
        sum += slot_scale[slot] * dy[slot_token[slot] * d_model + d];
    }
    gradients[params.b2_at + e * d_model + d] = sum;
}
