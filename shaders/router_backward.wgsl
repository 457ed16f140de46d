// router_backward: the router's weight gradients from dL/dh (gate_backward):
//   dWr[e, d] = Σ_t dh[t, e]·x[t, d],   dbr[e] = Σ_t dh[t, e]
// each summed over the tokens in order: the same bits on every run. CPU twin: the router
// sums of cpu_backward::backward.
//
// Dispatch: one invocation per element of [N, D + 1] (d = D is the bias), workgroups of 64
// in 2-D. Bindings: 0 params, 1 x [T, D], 2 d_logits [T, N], 3 gradients.

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
    let columns = d_model + 1u;
    if (index >= n * columns) {
        return;
    }
    let e = index / columns;
    let d = index % columns;
    let is_bias = d == d_model;
    if (is_bias && params.router_bias_at == ABSENT) {
        return;
    }
    var sum = 0.0;
    for (var t = 0u; t < params.num_tokens; t++) {
        let dh = d_logits[t * n + e];
        if (is_bias) {
            sum += dh;
        } else {
            sum += dh * x[t * d_model + d];
        }
    }
    if (is_bias) {
        gradients[params.router_bias_at + e] = sum;
    } else {
        gradients[params.router_weight_at + e * d_model + d] = sum;
    }
}
