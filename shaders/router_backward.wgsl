// router_backward: the router's weight gradients from dL/dh (gate_backward):
//   dWr[e, d] = Σ_t dh[t, e]·x[t, d],   dbr[e] = Σ_t dh[t, e]
// each summed over the tokens in order: the same bits on every run; zeros after a pre-routed
// forward (the router was not in its graph). CPU twin: cpu_backward_kernels::router_backward.
//
// Dispatch: one invocation per block of 4 experts × 4 columns of D (the last column block
// of each expert block holds the 4 biases), workgroups of 64 in 2-D. A block keeps its 16
// sums in registers and loads 8 values per token for them (one per output, unblocked).
// Loads past a tensor's edge feed only sums that are not written.
// Bindings: 0 params, 1 x [T, D], 2 d_logits [T, N], 3 the router's gradients (weight,
// then bias: backward_common.wgsl).

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> d_logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> gradients: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = linear_index(workgroup_id, num_workgroups, lane);
    let n = params.num_experts;
    let d_model = params.d_model;
    let column_blocks = (d_model + 3u) / 4u + 1u;
    if (index >= (n + 3u) / 4u * column_blocks) {
        return;
    }
    let e0 = index / column_blocks * 4u;
    let d0 = index % column_blocks * 4u;
    let is_bias = d0 >= d_model;
    if (is_bias && params.router_bias_at == ABSENT) {
        return;
    }
    // acc[i][c]: expert e0 + i, column d0 + c (biases: component 0).
    var acc = array<vec4<f32>, 4>();
    let num_tokens = select(params.num_tokens, 0u, params.pre_routed != 0u);
    for (var t = 0u; t < num_tokens; t++) {
        let at = t * n + e0;
        let dh = vec4(d_logits[at], d_logits[at + 1u], d_logits[at + 2u], d_logits[at + 3u]);
        var xs = vec4(1.0, 0.0, 0.0, 0.0);
        if (!is_bias) {
            let row = t * d_model + d0;
            xs = vec4(x[row], x[row + 1u], x[row + 2u], x[row + 3u]);
        }
        for (var i = 0u; i < 4u; i++) {
            acc[i] += dh[i] * xs;
        }
    }
    for (var i = 0u; i < 4u; i++) {
        let e = e0 + i;
        if (e >= n) {
            break;
        }
        if (is_bias) {
            gradients[params.router_bias_at + e] = acc[i].x;
            continue;
        }
        for (var c = 0u; c < 4u; c++) {
            if (d0 + c < d_model) {
                gradients[params.router_weight_at + e * d_model + d0 + c] = acc[i][c];
            }
        }
    }
}
