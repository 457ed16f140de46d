// combine_backward: dx gathered per token (no scatter, no atomics):
//   dx[t, d] = Σ_e Wr[e, d]·dh[t, e] + Σ_{kept j} dXslot[assignment_slot[t, j], d]
//              + π[t]·dy[t, d]
// the router's term in expert order (none after a pre-routed forward), then the choices in
// choice order, then the pass-through. CPU twin: cpu_backward_kernels::combine_backward.
//
// Dispatch: one invocation per token and 4 columns of D (the router weight's texels),
// workgroups of 64 in 2-D.
// Bindings: 0 params, 1 dy [T, D], 2 d_logits [T, N], 3 assignment_slot [T, k],
// 4 d_x_slot [slots, D], 5 pass_scale [T], 6 router [N][D4 / 4] texels (the forward's),
// 7 dx [T, D].

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> d_logits: array<f32>;
@group(0) @binding(3) var<storage, read> assignment_slot: array<u32>;
@group(0) @binding(4) var<storage, read> d_x_slot: array<f32>;
@group(0) @binding(5) var<storage, read> pass_scale: array<f32>;
@group(0) @binding(6) var router: texture_2d<f32>;
@group(0) @binding(7) var<storage, read_write> dx: array<f32>;

// Four values of a [rows, D] tensor from `at` (past D: whatever lies there, never stored).
fn row4(values_are_dy: bool, at: u32) -> vec4<f32> {
    if (values_are_dy) {
        return vec4(dy[at], dy[at + 1u], dy[at + 2u], dy[at + 3u]);
    }
    return vec4(d_x_slot[at], d_x_slot[at + 1u], d_x_slot[at + 2u], d_x_slot[at + 3u]);
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = linear_index(workgroup_id, num_workgroups, lane);
    let d_model = params.d_model;
    let quads = (d_model + 3u) / 4u;
    if (index >= params.num_tokens * quads) {
        return;
    }
    let token = index / quads;
    let d4 = index % quads;
    let n = select(params.num_experts, 0u, params.pre_routed != 0u);
    var sum = vec4(0.0);
    for (var e = 0u; e < n; e++) {
        sum += textureLoad(router, vec2(d4, e), 0) * d_logits[token * n + e];
    }
    let k = params.top_k;
    for (var j = 0u; j < k; j++) {
        let slot = assignment_slot[token * k + j];
        if (slot != DROPPED) {
            sum += row4(false, slot * d_model + 4u * d4);
        }
    }
    let at = token * d_model + 4u * d4;
    let out = sum + pass_scale[token] * row4(true, at);
    for (var c = 0u; c < 4u; c++) {
        if (4u * d4 + c < d_model) {
            dx[at + c] = out[c];
        }
    }
}
