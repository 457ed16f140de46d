// expert_hidden_backward: per kept slot and hidden unit f, the gradients of the expert's
// pre-activations, with the pre-activations recomputed from x (nothing of them was stored):
//   dh  = s·dy[t]·W2[e][:, f]          (dO = s·dy[t], s from gate_backward)
//   a   = x[t]·W1[e][f] + b1[e][f],    v = x[t]·W3[e][f] + b3[e][f] when gated
//   dA  = dh·v·act′(a),                dV = dh·act(a)       (dA = dh·act′(a) ungated)
// CPU twin: the expert part of cpu_backward::backward. Padding slots get zeros.
//
// Dispatch: one invocation per (slot, f) of the slot bound, workgroups of 64 in 2-D.
// Bindings: 0 params, 1 dy [T, D], 2 x [T, D], 3 slot_token [slots], 4 expert_table,
// 5 slot_scale [slots], 6 parameters, 7 d_a [slots, F], 8 d_v [slots, F] (gated).

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> slot_token: array<u32>;
@group(0) @binding(4) var<storage, read> expert_table: array<u32>;
@group(0) @binding(5) var<storage, read> slot_scale: array<f32>;
@group(0) @binding(6) var<storage, read> parameters: array<f32>;
@group(0) @binding(7) var<storage, read_write> d_a: array<f32>;
@group(0) @binding(8) var<storage, read_write> d_v: array<f32>;

// x[token]·row `row` of the [rows, D] matrix at `at`, plus the bias at `bias_at` (if any).
fn x_dot_row(token: u32, at: u32, row: u32, bias_at: u32) -> f32 {
    let d_model = params.d_model;
    var sum = 0.0;
    for (var d = 0u; d < d_model; d++) {
        sum += x[token * d_model + d] * parameters[at + row * d_model + d];
    }
    if (bias_at != ABSENT) {
        sum += parameters[bias_at + row];
    }
    return sum;
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = linear_index(workgroup_id, num_workgroups, lane);
    let d_ff = params.d_ff;
    if (index >= params.max_slots * d_ff) {
        return;
    }
    let slot = index / d_ff;
    let f = index % d_ff;
    let gated = params.gated != 0u;
    let e = slot_expert(slot);
    if (e == ABSENT) {
        d_a[index] = 0.0;
        if (gated) {
            d_v[index] = 0.0;
        }
        return;
    }
    let token = slot_token[slot];
    let d_model = params.d_model;

    // dh = s·Σ_d dy[t, d]·W2[e, d, f].
    let w2_at = params.w2_at + e * d_model * d_ff + f;
    var dh = 0.0;
    for (var d = 0u; d < d_model; d++) {
        dh += dy[token * d_model + d] * parameters[w2_at + d * d_ff];
    }
    dh *= slot_scale[slot];

    let b1_at = select(ABSENT, params.b1_at + e * d_ff, params.b1_at != ABSENT);
    let a = x_dot_row(token, params.w1_at + e * d_ff * d_model, f, b1_at);
    if (gated) {
        let b3_at = select(ABSENT, params.b3_at + e * d_ff, params.b3_at != ABSENT);
        let v = x_dot_row(token, params.w3_at + e * d_ff * d_model, f, b3_at);
        d_a[index] = dh * v * activation_derivative(a);
        d_v[index] = dh * activate(a);
    } else {
        d_a[index] = dh * activation_derivative(a);
    }
}
