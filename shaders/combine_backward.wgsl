// combine_backward: dx gathered per token (no scatter, no atomics):
//   dx[t, d] = Σ_e Wr[e, d]·dh[t, e] + Σ_{kept j} dXslot[assignment_slot[t, j], d]
//              + π[t]·dy[t, d]
// the router's term in expert order (none after a pre-routed forward), then the choices in
// choice order, then the pass-through. CPU twin: cpu_backward_kernels::combine_backward.
//
// Dispatch: one invocation per element of [T, D], workgroups of 64 in 2-D.
// Bindings: 0 params, 1 dy [T, D], 2 d_logits [T, N], 3 assignment_slot [T, k],
// 4 d_x_slot [slots, D], 5 pass_scale [T], 6 parameters, 7 dx [T, D].

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> d_logits: array<f32>;
@group(0) @binding(3) var<storage, read> assignment_slot: array<u32>;
@group(0) @binding(4) var<storage, read> d_x_slot: array<f32>;
@group(0) @binding(5) var<storage, read> pass_scale: array<f32>;
@group(0) @binding(6) var<storage, read> parameters: array<f32>;
@group(0) @binding(7) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = linear_index(workgroup_id, num_workgroups, lane);
    let d_model = params.d_model;
    if (index >= params.num_tokens * d_model) {
        return;
    }
    let token = index / d_model;
    let d = index % d_model;
    let n = select(params.num_experts, 0u, params.pre_routed != 0u);
    var sum = 0.0;
    for (var e = 0u; e < n; e++) {
        sum += parameters[params.router_weight_at + e * d_model + d] * d_logits[token * n + e];
    }
    let k = params.top_k;
    for (var j = 0u; j < k; j++) {
        let slot = assignment_slot[token * k + j];
        if (slot != DROPPED) {
            sum += d_x_slot[slot * d_model + d];
        }
    }
    dx[index] = sum + pass_scale[token] * dy[index];
}
