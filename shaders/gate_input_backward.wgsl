// gate_input_backward: with `gate_on: input` (Llama 4: y += E(g·x)), the gates' part of
// dL/dh (h = the router logits), which needs every slot's input gradient and so runs after
// expert_input_backward; gate_backward left it out and wrote the rest of dh (the aux and
// z losses, the pass-through, a shared expert's gate). CPU twin:
// cpu_backward_kernels::gate_input_backward. Per token, over its routed choices j:
//   dg_j = s·⟨dU[slot_j], x[t]⟩      (dU = ∇E at g·x, expert_input_backward's d_x_slot; s
//                                    the routed scaling factor: g = s·normalised(q))
//   dq = dg through the top-k normalisation over ALL choices (dropped ones too)
//   dh[e] += dq_j·p·(1 − p) at e = route_j                  (sigmoid scores)
//   dh[e] += p[e]·(dp[e] − Σ_j q_j·dq_j), dp = dq at routes  (softmax scores)
// with p recomputed from the saved logits as route_tokens computed it (gate_scores.wgsl). A dropped choice
// has no slot and dg 0. The token's row of d_logits is its own: no atomics.
//
// Dispatch: one invocation per token, workgroups of 64 in 2-D.
// Bindings: 0 params, 1 x [T, D], 2 logits [T, R], 3 routes [T, k], 4 assignment_slot
// [T, k] (k = top_k: the routed choices, then a shared expert's slices), 5 d_x_slot
// [slots, D], 6 d_logits [T, R].

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> routes: array<u32>;
@group(0) @binding(4) var<storage, read> assignment_slot: array<u32>;
@group(0) @binding(5) var<storage, read> d_x_slot: array<f32>;
@group(0) @binding(6) var<storage, read_write> d_logits: array<f32>;

// dp/dh on the diagonal: p·(1 − p) for a sigmoid, p for a softmax (whose off-diagonal
// part is the caller's).
fn slope(p: f32, sigmoid: bool) -> f32 {
    return select(p, p * (1.0 - p), sigmoid);
}

// x[token]·dU[slot].
fn dot_x_slot(token: u32, slot: u32) -> f32 {
    let d_model = params.d_model;
    var sum = 0.0;
    for (var d = 0u; d < d_model; d++) {
        sum += x[token * d_model + d] * d_x_slot[slot * d_model + d];
    }
    return sum;
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let token = linear_index(workgroup_id, num_workgroups, lane);
    if (token >= params.num_tokens) {
        return;
    }
    let n = params.routed_experts;
    let k = params.routed_top_k;
    let stride = params.top_k;
    let row = token * params.router_rows;
    let sigmoid = params.sigmoid_scores != 0u;
    let scores = row_scores(row, n, sigmoid);

    // Σ_j q_j over all choices (q_j = p[route_j]), for the normalisation.
    var q_total = 0.0;
    for (var j = 0u; j < k; j++) {
        q_total += score_of(scores, routes[token * stride + j]);
    }
    let normalize = params.normalize_top_k != 0u;
    let inverse_total = select(1.0, 1.0 / q_total, normalize);

    // dq_j = dg_j / Σq − (Σ_i dg_i·q_i) / (Σq)² (normalising; else dg_j), added in two
    // steps: the dg_j / Σq of the kept choices, then the shift over all of them.
    var weighted = 0.0;
    for (var j = 0u; j < k; j++) {
        let slot = assignment_slot[token * stride + j];
        if (slot == DROPPED) {
            continue;
        }
        let e = routes[token * stride + j];
        let q = score_of(scores, e);
        let dg = params.routed_scaling_factor * dot_x_slot(token, slot);
        d_logits[row + e] += dg * inverse_total * slope(q, sigmoid);
        weighted += dg * q;
    }
    let shift = select(0.0, weighted * inverse_total * inverse_total, normalize);
    if (normalize) {
        for (var j = 0u; j < k; j++) {
            let e = routes[token * stride + j];
            let q = score_of(scores, e);
            d_logits[row + e] -= shift * slope(q, sigmoid);
        }
    }
    if (sigmoid) {
        return;
    }
    // Softmax's off-diagonal part: dh[e] −= p[e]·Σ_j q_j·dq_j, for every expert.
    let mean = weighted * inverse_total - shift * q_total;
    for (var e = 0u; e < n; e++) {
        d_logits[row + e] -= softmax_of(scores, e) * mean;
    }
}
