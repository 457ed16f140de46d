// gate_backward: per token, dL/dh (h = the router logits) from the gates, the pass-through,
// the aux loss and the z-loss (SPEC "Backward"; CPU twin:
// cpu_backward_kernels::gate_backward), and the scales the expert backward needs:
//   G_j = dy[t]·O[slot_j] for each kept choice j (O = the expert's output, before the gate),
//   dg_j = G_j (scale_by_prob) or G_j / g_j (the unscaled gate g / stop_gradient(g)),
//   dq = dg through the top-k normalisation over ALL choices (dropped ones too), plus the
//   pass-through's dot(dy, x) on choice 0 when every choice was dropped,
//   dp[e] = Σ_j dq_j [route_j = e] + α·N·counts[e] / T² + g[e]   (aux through
//           route_prob_sum, and g the caller's own gradient of route_prob_sum),
//   dh[e] = p[e]·(dp[e] − Σ_e' p[e']·dp[e']) + β·2·lse·softmax[e] / T   (softmax scores),
//   dh[e] = dp[e]·p[e]·(1 − p[e]) + β·2·lse·softmax[e] / T             (sigmoid scores),
// the z-loss's term through the logits' softmax whatever the scores, and dg scaled by the
// routed scaling factor (g = s·normalised(q)). p is recomputed from the saved logits as
// route_tokens computed it (gate_scores.wgsl). dh is built in place in
// the token's row of d_logits (routes of a token are distinct experts, so each dq_j has its
// own element). All of it is over the routed experts and choices (routed_experts,
// routed_top_k); a shared expert's slices, the choices after them, are scaled by their gate
// s = σ(h_N) (the router's row N, no score) or 1, and its logit gets
//   dh_N = Σ_slices dy[t]·O[slot]·s·(1 − s).
// With GATE_INPUT (gate_on: input) a kept routed choice's slot scale is 1 and its dg is
// gate_input_backward's (it needs the slots' input gradients).
// After a pre-routed forward (forward_experts: the caller's weights w are the gates, no
// router), the token's row of d_logits holds dL/dw_j = dy[t]·O[slot_j] in its first k
// columns instead, slot_scale[slot_j] = w_j, and pass_scale is 0.
//
// Dispatch: one invocation per token, workgroups of 64 in 2-D.
// Bindings: 0 params, 1 dy [T, D], 2 x [T, D], 3 logits [T, R] (R = router_rows),
// 4 routes [T, k], 5 gates [T, k], 6 assignment_slot [T, k] (k = top_k: the routed choices
// then the shared slices), 7 expert_out [slots, D], 8 counts [N] (the
// whole batch's, when it runs in chunks; T in the loss terms is loss_tokens),
// 9 d_logits [T, R], 10 slot_scale [slots] (s_j: dO[slot] = s_j·dy[t]),
// 11 pass_scale [T] (π when the token passed through, else 0), 12 prob_sum_grad [N] (g).

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> logits: array<f32>;
@group(0) @binding(4) var<storage, read> routes: array<u32>;
@group(0) @binding(5) var<storage, read> gates: array<f32>;
@group(0) @binding(6) var<storage, read> assignment_slot: array<u32>;
@group(0) @binding(7) var<storage, read> expert_out: array<f32>;
@group(0) @binding(8) var<storage, read> counts: array<u32>;
@group(0) @binding(9) var<storage, read_write> d_logits: array<f32>;
@group(0) @binding(10) var<storage, read_write> slot_scale: array<f32>;
@group(0) @binding(11) var<storage, read_write> pass_scale: array<f32>;
@group(0) @binding(12) var<storage, read> prob_sum_grad: array<f32>;

// dy[token]·x[token].
fn dot_dy_x(token: u32) -> f32 {
    let d_model = params.d_model;
    var sum = 0.0;
    for (var d = 0u; d < d_model; d++) {
        sum += dy[token * d_model + d] * x[token * d_model + d];
    }
    return sum;
}

// dy[token]·O[slot].
fn dot_dy_out(token: u32, slot: u32) -> f32 {
    let d_model = params.d_model;
    var sum = 0.0;
    for (var d = 0u; d < d_model; d++) {
        sum += dy[token * d_model + d] * expert_out[slot * d_model + d];
    }
    return sum;
}

// Whether the gates scaled the experts' inputs (gate_on: input, Llama 4).
override GATE_INPUT: bool = false;

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
    if (params.pre_routed != 0u) {
        for (var j = 0u; j < k; j++) {
            let assignment = token * k + j;
            let slot = assignment_slot[assignment];
            var d_weight = 0.0;
            if (slot != DROPPED) {
                slot_scale[slot] = gates[assignment];
                d_weight = dot_dy_out(token, slot);
            }
            d_logits[row + j] = d_weight;
        }
        pass_scale[token] = 0.0;
        return;
    }
    let scale_by_prob = params.scale_by_prob != 0u;
    let tokens = f32(params.loss_tokens);

    let sigmoid = params.sigmoid_scores != 0u;
    let scores = row_scores(row, n, sigmoid);

    // dp starts as route_prob_sum's terms: the aux loss's α·N·counts[e] / T², plus g[e].
    let aux_scale = params.aux_coef * f32(n) / (tokens * tokens);
    for (var e = 0u; e < n; e++) {
        d_logits[row + e] = aux_scale * f32(counts[e]) + prob_sum_grad[e];
    }

    // Σ_j q_j over all choices, for the normalisation.
    var q_total = 0.0;
    for (var j = 0u; j < k; j++) {
        q_total += score_of(scores, routes[token * stride + j]);
    }
    let normalize = params.normalize_top_k != 0u;
    let inverse_total = select(1.0, 1.0 / q_total, normalize);

    // dq_j = dg_j / Σq − (Σ_i dg_i·q_i) / (Σq)² when normalising, else dg_j.
    var weighted = 0.0;
    var any_kept = false;
    for (var j = 0u; j < k; j++) {
        let assignment = token * stride + j;
        let slot = assignment_slot[assignment];
        if (slot == DROPPED) {
            continue;
        }
        any_kept = true;
        if (GATE_INPUT) {
            slot_scale[slot] = 1.0;
            continue;
        }
        let gate = gates[assignment];
        let q = score_of(scores, routes[assignment]);
        let g_dot = dot_dy_out(token, slot);
        let dg = params.routed_scaling_factor * select(g_dot / gate, g_dot, scale_by_prob);
        slot_scale[slot] = select(1.0, gate, scale_by_prob);
        d_logits[row + routes[assignment]] += dg * inverse_total;
        weighted += dg * q;
    }
    if (normalize) {
        let shift = weighted * inverse_total * inverse_total;
        for (var j = 0u; j < k; j++) {
            d_logits[row + routes[token * stride + j]] -= shift;
        }
    }

    // Every choice dropped: y = π·x with π = q_0 (scaling) or q_0 / stop_gradient(q_0).
    var pi = 0.0;
    if (!any_kept && params.pass_through != 0u) {
        let q0 = score_of(scores, routes[token * stride]);
        pi = select(1.0, q0, scale_by_prob);
        let g_dot = dot_dy_x(token);
        d_logits[row + routes[token * stride]] += select(g_dot / q0, g_dot, scale_by_prob);
    }
    pass_scale[token] = pi;

    // The shared expert's slices (never dropped): scaled by their gate s, whose logit is
    // the router's row N when it has one.
    var d_shared = 0.0;
    for (var j = k; j < stride; j++) {
        let assignment = token * stride + j;
        let slot = assignment_slot[assignment];
        slot_scale[slot] = gates[assignment];
        d_shared += dot_dy_out(token, slot);
    }
    if (params.router_rows > n) {
        let s = 1.0 / (1.0 + exp(-logits[row + n]));
        d_logits[row + n] = d_shared * s * (1.0 - s);
    }

    // Softmax backward plus the z-loss: dh = p·(dp − Σ p·dp) + β·2·lse·p / T.
    let z_scale = params.z_coef * 2.0 * log_sum_exp(scores) / tokens;
    if (sigmoid) {
        for (var e = 0u; e < n; e++) {
            let p = score_of(scores, e);
            let softmax = softmax_of(scores, e);
            d_logits[row + e] = d_logits[row + e] * p * (1.0 - p) + z_scale * softmax;
        }
        return;
    }
    var mean = 0.0;
    for (var e = 0u; e < n; e++) {
        mean += softmax_of(scores, e) * d_logits[row + e];
    }
    for (var e = 0u; e < n; e++) {
        let p = softmax_of(scores, e);
        d_logits[row + e] = p * (d_logits[row + e] - mean) + z_scale * p;
    }
}
