// expert_hidden_backward: per kept slot and hidden unit f, the gradients of the expert's
// pre-activations, with the pre-activations recomputed from x (nothing of them was stored):
//   dh  = s·dy[t]·W2[e][:, f]          (dO = s·dy[t], s from gate_backward)
//   a   = x[t]·W1[e][f] + b1[e][f],    v = x[t]·W3[e][f] + b3[e][f] when gated
//   dA  = dh·v·act′(a),                dV = dh·act(a)       (dA = dh·act′(a) ungated)
// CPU twin: cpu_backward_kernels::expert_hidden_backward. Padding slots get zeros.
//
// Dispatch: one invocation per block of 4 slots × 4 units of F, workgroups of 64 in 2-D.
// The 4 slots of a block lie in one row tile, so one expert holds them all (a padding slot
// computes from a clamped token and writes zeros). Per step along D a block loads 4 values
// of dy and of x and 4 of each weight matrix for its 32 (48 gated) multiply-adds. Loads
// past a tensor's edge feed only values that are not written.
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

// Column d of rows f0 .. f0 + 4 of the [F, D] matrix at `at`.
fn column4(at: u32, f0: u32, d: u32) -> vec4<f32> {
    let d_model = params.d_model;
    let base = at + f0 * d_model + d;
    return vec4(parameters[base], parameters[base + d_model],
        parameters[base + 2u * d_model], parameters[base + 3u * d_model]);
}

// Element d of the rows of `values` ([T, D]) of the four tokens.
fn gather4(values_are_dy: bool, tokens: vec4<u32>, d: u32) -> vec4<f32> {
    let at = tokens * params.d_model + vec4(d);
    if (values_are_dy) {
        return vec4(dy[at.x], dy[at.y], dy[at.z], dy[at.w]);
    }
    return vec4(x[at.x], x[at.y], x[at.z], x[at.w]);
}

// The bias at `bias_at` (if any) of units f0 .. f0 + 4 of expert e.
fn bias4(bias_at: u32, e: u32, f0: u32) -> vec4<f32> {
    if (bias_at == ABSENT) {
        return vec4(0.0);
    }
    let at = bias_at + e * params.d_ff + f0;
    return vec4(parameters[at], parameters[at + 1u], parameters[at + 2u], parameters[at + 3u]);
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = linear_index(workgroup_id, num_workgroups, lane);
    let d_ff = params.d_ff;
    let unit_blocks = (d_ff + 3u) / 4u;
    if (index >= params.max_slots / 4u * unit_blocks) {
        return;
    }
    let slot0 = index / unit_blocks * 4u;
    let f0 = index % unit_blocks * 4u;
    let gated = params.gated != 0u;
    let block = slot_block(slot0);
    let valid = block.valid;
    let e = block.expert;
    if (e == ABSENT) {
        for (var i = 0u; i < 4u; i++) {
            for (var c = 0u; c < 4u; c++) {
                if (f0 + c < d_ff) {
                    d_a[(slot0 + i) * d_ff + f0 + c] = 0.0;
                    if (gated) {
                        d_v[(slot0 + i) * d_ff + f0 + c] = 0.0;
                    }
                }
            }
        }
        return;
    }
    let last_token = params.num_tokens - 1u;
    let tokens = min(vec4(slot_token[slot0], slot_token[slot0 + 1u], slot_token[slot0 + 2u],
        slot_token[slot0 + 3u]), vec4(last_token));
    let d_model = params.d_model;
    let w1_at = params.w1_at + e * d_ff * d_model;
    let w3_at = params.w3_at + e * d_ff * d_model;
    let w2_at = params.w2_at + e * d_model * d_ff + f0;

    // dh[i][c], a[i][c], v[i][c]: slot slot0 + i, unit f0 + c; sums along D in order.
    var dh = array<vec4<f32>, 4>();
    var a = array<vec4<f32>, 4>();
    var v = array<vec4<f32>, 4>();
    for (var d = 0u; d < d_model; d++) {
        let dys = gather4(true, tokens, d);
        let xs = gather4(false, tokens, d);
        let w2_row = w2_at + d * d_ff;
        let w2 = vec4(parameters[w2_row], parameters[w2_row + 1u], parameters[w2_row + 2u],
            parameters[w2_row + 3u]);
        let w1 = column4(w1_at, f0, d);
        for (var i = 0u; i < 4u; i++) {
            dh[i] += dys[i] * w2;
            a[i] += xs[i] * w1;
        }
        if (gated) {
            let w3 = column4(w3_at, f0, d);
            for (var i = 0u; i < 4u; i++) {
                v[i] += xs[i] * w3;
            }
        }
    }
    let b1 = bias4(params.b1_at, e, f0);
    let b3 = bias4(params.b3_at, e, f0);
    for (var i = 0u; i < 4u; i++) {
        let slot = slot0 + i;
        let scale = select(0.0, slot_scale[slot], valid[i]);
        for (var c = 0u; c < 4u; c++) {
            if (f0 + c >= d_ff) {
                break;
            }
            let at = slot * d_ff + f0 + c;
            let grad_h = dh[i][c] * scale;
            let pre = a[i][c] + b1[c];
            if (gated) {
                d_a[at] = grad_h * (v[i][c] + b3[c]) * activation_derivative(pre);
                d_v[at] = grad_h * activate(pre);
            } else {
                d_a[at] = grad_h * activation_derivative(pre);
            }
        }
    }
}
