// expert_input_backward: per kept slot, the gradient of the expert's input row through the
// transposed up-projections:
//   dXslot[slot, d] = Σ_f dA[slot, f]·W1[e, f, d] (+ dV[slot, f]·W3[e, f, d] when gated)
// in f order; combine_backward gathers the slots of each token. Padding slots get zeros.
// CPU twin: the x terms of the expert part of cpu_backward::backward.
//
// Dispatch: one invocation per (slot, d) of the slot bound, workgroups of 64 in 2-D.
// Bindings: 0 params, 1 expert_table, 2 d_a [slots, F], 3 d_v [slots, F], 4 parameters,
// 5 d_x_slot [slots, D].

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> expert_table: array<u32>;
@group(0) @binding(2) var<storage, read> d_a: array<f32>;
@group(0) @binding(3) var<storage, read> d_v: array<f32>;
@group(0) @binding(4) var<storage, read> parameters: array<f32>;
@group(0) @binding(5) var<storage, read_write> d_x_slot: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = linear_index(workgroup_id, num_workgroups, lane);
    let d_model = params.d_model;
    if (index >= params.max_slots * d_model) {
        return;
    }
    let slot = index / d_model;
    let d = index % d_model;
    let e = slot_expert(slot);
    if (e == ABSENT) {
        d_x_slot[index] = 0.0;
        return;
    }
    let d_ff = params.d_ff;
    let w1_at = params.w1_at + e * d_ff * d_model + d;
    var sum = 0.0;
    for (var f = 0u; f < d_ff; f++) {
        sum += d_a[slot * d_ff + f] * parameters[w1_at + f * d_model];
    }
    if (params.gated != 0u) {
        let w3_at = params.w3_at + e * d_ff * d_model + d;
        for (var f = 0u; f < d_ff; f++) {
            sum += d_v[slot * d_ff + f] * parameters[w3_at + f * d_model];
        }
    }
    d_x_slot[index] = sum;
}
