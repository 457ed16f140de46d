// expert_down_backward: the down-projection's weight gradients as a grouped transposed
// matmul over each expert's own rows (no atomics; ScatterMoE's "XtY"):
//   dW2[e, d, f] = Σ_{slots of e} s·dy[t, d]·H[slot, f],   db2[e, d] = Σ s·dy[t, d]
// with H the hidden rows the training forward left in `hidden`. Each element's sum runs over
// the expert's slots in slot order: the same bits on every run. CPU twin:
// cpu_backward_kernels::expert_down_backward.
//
// Dispatch: one invocation per block of 4 rows of D × 4 columns of F of one expert (the
// last column block holds db2 for the 4 rows), workgroups of 64 in 2-D. Per slot a block
// loads 4 values of dy and one vec4 of H for its 16 sums. Loads past a tensor's edge feed
// only sums that are not written.
// Bindings: 0 params, 1 dy [T, D], 2 slot_token [slots], 3 expert_table,
// 4 slot_scale [slots], 5 hidden [slots, hidden_stride] as vec4s, 6 gradients.

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var<storage, read> slot_scale: array<f32>;
@group(0) @binding(5) var<storage, read> hidden: array<vec4<f32>>;
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
    let row_blocks = (d_model + 3u) / 4u;
    let column_blocks = (d_ff + 3u) / 4u + 1u;
    if (index >= n * row_blocks * column_blocks) {
        return;
    }
    let e = index / (row_blocks * column_blocks);
    let d0 = index / column_blocks % row_blocks * 4u;
    let f0 = index % column_blocks * 4u;
    let is_bias = f0 >= d_ff;
    if (is_bias && params.b2_at == ABSENT) {
        return;
    }
    let first = expert_table[2u * n + e] * params.row_tile;
    let rows = expert_table[n + e];
    let h_stride = params.hidden_stride / 4u;
    // acc[i][c]: row d0 + i, column f0 + c (db2: component 0).
    var acc = array<vec4<f32>, 4>();
    for (var r = 0u; r < rows; r++) {
        let slot = first + r;
        let at = slot_token[slot] * d_model + d0;
        let d_out = slot_scale[slot] * vec4(dy[at], dy[at + 1u], dy[at + 2u], dy[at + 3u]);
        var h = vec4(1.0, 0.0, 0.0, 0.0);
        if (!is_bias) {
            h = hidden[slot * h_stride + f0 / 4u];
        }
        for (var i = 0u; i < 4u; i++) {
            acc[i] += d_out[i] * h;
        }
    }
    for (var i = 0u; i < 4u; i++) {
        let d = d0 + i;
        if (d >= d_model) {
            break;
        }
        if (is_bias) {
            gradients[params.b2_at + e * d_model + d] = acc[i].x;
            continue;
        }
        for (var c = 0u; c < 4u; c++) {
            if (f0 + c < d_ff) {
                gradients[params.w2_at + (e * d_model + d) * d_ff + f0 + c] = acc[i][c];
            }
        }
    }
}
