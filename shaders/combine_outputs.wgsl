// combine_outputs: y[t] = Σ_j s[t, j]·O[assignment_slot[t, j]] over the kept choices, in
// choice order (a fixed order: no float atomics anywhere). A token with no kept routed
// choice passes through (x[t], times route_prob_max[t] when scaling) or is zero, by drop
// policy; then the shared expert's choices add their slices, weighed by their gates.
//
// Dispatch: one invocation per element of y, workgroups of 256 laid out in 2-D.
// Bindings: 0 params, 1 x [T, D], 2 assignment_slot [T, k], 3 gates [T, k],
// 4 route_prob_max [T], 5 expert_out [slots, D], 6 y [T, D].

struct CombineParams {
    num_tokens: u32,
    d_model: u32,
    top_k: u32,
    scale_by_prob: u32,
    pass_through: u32,
    // The routed choices, the first of top_k: the pass-through and the drop policy concern
    // them only; the shared expert's choices after them are always weighed by their gates.
    routed_top_k: u32,
    // 1 with gate_on: input: the gates scaled the experts' inputs (expert_up), not here.
    gate_input: u32,
    _pad0: u32,
}

const WORKGROUP: u32 = 256u;
const DROPPED: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> params: CombineParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> assignment_slot: array<u32>;
@group(0) @binding(3) var<storage, read> gates: array<f32>;
@group(0) @binding(4) var<storage, read> route_prob_max: array<f32>;
@group(0) @binding(5) var<storage, read> expert_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = (workgroup_id.x + workgroup_id.y * num_workgroups.x) * WORKGROUP + lane;
    let d_model = params.d_model;
    if (index >= params.num_tokens * d_model) {
        return;
    }
    let token = index / d_model;
    let column = index % d_model;
    let top_k = params.top_k;
    let scale_by_prob = params.scale_by_prob != 0u;
    let scale_outputs = scale_by_prob && params.gate_input == 0u;

    var sum = 0.0;
    var any_kept = false;
    for (var choice = 0u; choice < params.routed_top_k; choice++) {
        let slot = assignment_slot[token * top_k + choice];
        if (slot != DROPPED) {
            any_kept = true;
            let scale = select(1.0, gates[token * top_k + choice], scale_outputs);
            sum += scale * expert_out[slot * d_model + column];
        }
    }
    if (!any_kept && params.pass_through != 0u) {
        sum = x[index] * select(1.0, route_prob_max[token], scale_by_prob);
    }
    // The shared expert's slices: never dropped, weighed by σ(x·gate) or 1.
    for (var choice = params.routed_top_k; choice < top_k; choice++) {
        let slot = assignment_slot[token * top_k + choice];
        sum += gates[token * top_k + choice] * expert_out[slot * d_model + column];
    }
    y[index] = sum;
}
