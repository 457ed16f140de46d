// route_tokens: router logits h = x·Wrᵀ + br, scores p (stable softmax, or sigmoid), the
// choice of experts (top-k of p + score_bias, within the best groups of experts when the
// router has groups; ties to the lower expert index and the lower group), gate weights (the
// choices' unbiased p, renormalised when asked, times the routed scaling factor), non-finite
// logits flagged, and per-block partial sums for the router statistics. CPU twin:
// cpu_routing::route_tokens.
//
// Dispatch: one workgroup per block of BLOCK_TOKENS consecutive tokens; workgroups laid out
// in 2-D (x + y·num_workgroups.x) so that any T fits. First the logits, each invocation
// four tokens × a quarter of the experts, eight experts per pass over x (so each router
// texel fetched serves four tokens), with each quarter's largest logit per token; then,
// after a barrier, one invocation per token for the rest. Probabilities are never stored:
// p = exp(h - max) / Σ exp(h - max) is recomputed from the logits where needed (top-k, the
// block sums) by the same expression, so that the N values per token go through storage
// half as many times.
// Operands are textures: x's rows as stage_tokens wrote them and the router weights (on
// CPU adapters a storage load is a loop over the SIMD lanes, a texel fetch a vector
// gather); the biases are a uniform array (every lane reads the same bias: one scalar load
// there).
// Bindings: 0 params, 1 x_rows texels [layers][height][D4 / 4] (zero-padded, token t at row
// t % height of layer t / height), 2 router texels [N][D4 / 4] (zero-padded),
// 3 logits [T, N], 4 routes [T, k], 5 gates [T, k], 6 route_prob_max [T],
// 7 block_router_sums [blocks, N + 1] (Σ p per expert, then Σ lse²), 8 flags [1] (atomicMin
// of the first token whose logits are not finite), 9 router_bias and 10 score_bias, each
// [MAX_EXPERTS / 4] vec4s (zero-padded). D4 is D rounded up to a multiple of 4.

struct RouteParams {
    num_tokens: u32,
    d_model: u32,
    num_experts: u32,
    top_k: u32,
    normalize_top_k: u32,
    // 1: p = σ(h) per expert; 0: p = softmax(h).
    sigmoid_scores: u32,
    // Group-limited top-k: n_group groups of experts (0: none), topk_group of them kept,
    // a group's score the sum of its two best selection scores (group_score_max 0) or its
    // best (1).
    n_group: u32,
    topk_group: u32,
    group_score_max: u32,
    routed_scaling_factor: f32,
    // The shared expert's slices (experts num_experts.. of the matmuls), every token's
    // choices after its top_k (0: none); 1 when the router's row num_experts is their gate.
    shared_experts: u32,
    shared_gate: u32,
}

const BLOCK_TOKENS: u32 = 128u;
// Tokens per quarter of a block: block_logits gives each invocation four tokens, one from
// each quarter, and a quarter of the experts.
const QUARTER: u32 = BLOCK_TOKENS / 4u;
// The most experts (count_experts' histogram): router_bias holds MAX_EXPERTS / 4 vec4s.
const MAX_EXPERTS: u32 = 2048u;

@group(0) @binding(0) var<uniform> params: RouteParams;
@group(0) @binding(1) var x_rows: texture_2d_array<f32>;
@group(0) @binding(2) var router: texture_2d<f32>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;
@group(0) @binding(4) var<storage, read_write> routes: array<u32>;
@group(0) @binding(5) var<storage, read_write> gates: array<f32>;
@group(0) @binding(6) var<storage, read_write> route_prob_max: array<f32>;
@group(0) @binding(7) var<storage, read_write> block_router_sums: array<f32>;
@group(0) @binding(8) var<storage, read_write> flags: array<atomic<u32>>;
@group(0) @binding(9) var<uniform> router_bias: array<vec4<f32>, MAX_EXPERTS / 4u>;
@group(0) @binding(10) var<uniform> score_bias: array<vec4<f32>, MAX_EXPERTS / 4u>;

// The most expert groups: a token's kept groups are the bits of one u32.
const MAX_EXPERT_GROUPS: u32 = 32u;


var<workgroup> block_lse_sq: array<f32, BLOCK_TOKENS>;
// The largest logit of each token (block order) among each quarter's experts, quarter-major.
var<workgroup> quarter_max: array<f32, 4u * BLOCK_TOKENS>;
// Each token's largest logit and Σ exp(h - max): its softmax, for the block sums.
var<workgroup> token_max: array<f32, BLOCK_TOKENS>;
var<workgroup> token_sum: array<f32, BLOCK_TOKENS>;

// Rows of the router and columns of `logits`: the routed experts, then the shared expert's
// gate when it has one.
fn router_rows() -> u32 {
    return params.num_experts + params.shared_gate;
}

// Each token's choices (the stride of routes and gates): its top_k, then the shared
// expert's slices.
fn choices() -> u32 {
    return params.top_k + params.shared_experts;
}

// Checks the bit pattern rather than comparing floats, which a compiler may assume finite.
fn is_finite_bits(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

// Router logits h[t, e] = x[t]·Wr[e] + br[e] of the block's tokens, into `logits`. Invocation
// `lane` takes tokens lane % QUARTER + QUARTER·j (j < 4) and the experts of quarter
// lane / QUARTER, eight per pass: each router texel fetched serves four tokens.
fn block_logits(block_start: u32, block_end: u32, lane: u32) {
    let d_model = params.d_model;
    let num_experts = router_rows();
    let d4 = (d_model + 3u) / 4u;
    let first = block_start + lane % QUARTER;
    // Tokens past the block's end compute on its last token and store nothing.
    let tokens = min(vec4(first) + vec4(0u, 1u, 2u, 3u) * QUARTER, vec4(block_end - 1u));
    let height = textureDimensions(x_rows).y;
    let rows = tokens % height;
    let layers = tokens / height;
    let per_quarter = (num_experts + 3u) / 4u;
    let quarter = lane / QUARTER;
    let e_begin = quarter * per_quarter;
    let e_end = min(e_begin + per_quarter, num_experts);
    var largest = vec4(bitcast<f32>(0xff7fffffu)); // -f32::MAX, exactly
    for (var e0 = e_begin; e0 < e_end; e0 += 8u) {
        // The last pass re-reads the quarter's last expert for the missing ones.
        let lo = min(vec4(e0) + vec4(0u, 1u, 2u, 3u), vec4(e_end - 1u));
        let hi = min(vec4(e0) + vec4(4u, 5u, 6u, 7u), vec4(e_end - 1u));
        // sum_lo_j[i]: token j's partial logit for expert lo[i].
        var sum_lo0 = vec4(0.0);
        var sum_lo1 = vec4(0.0);
        var sum_lo2 = vec4(0.0);
        var sum_lo3 = vec4(0.0);
        var sum_hi0 = vec4(0.0);
        var sum_hi1 = vec4(0.0);
        var sum_hi2 = vec4(0.0);
        var sum_hi3 = vec4(0.0);
        for (var k4 = 0u; k4 < d4; k4++) {
            // Rows are experts: w·x is four dot products.
            let w_lo = transpose(mat4x4(textureLoad(router, vec2(k4, lo.x), 0),
                textureLoad(router, vec2(k4, lo.y), 0), textureLoad(router, vec2(k4, lo.z), 0),
                textureLoad(router, vec2(k4, lo.w), 0)));
            let w_hi = transpose(mat4x4(textureLoad(router, vec2(k4, hi.x), 0),
                textureLoad(router, vec2(k4, hi.y), 0), textureLoad(router, vec2(k4, hi.z), 0),
                textureLoad(router, vec2(k4, hi.w), 0)));
            let x0 = textureLoad(x_rows, vec2(k4, rows.x), layers.x, 0);
            let x1 = textureLoad(x_rows, vec2(k4, rows.y), layers.y, 0);
            let x2 = textureLoad(x_rows, vec2(k4, rows.z), layers.z, 0);
            let x3 = textureLoad(x_rows, vec2(k4, rows.w), layers.w, 0);
            sum_lo0 += w_lo * x0;
            sum_hi0 += w_hi * x0;
            sum_lo1 += w_lo * x1;
            sum_hi1 += w_hi * x1;
            sum_lo2 += w_lo * x2;
            sum_hi2 += w_hi * x2;
            sum_lo3 += w_lo * x3;
            sum_hi3 += w_hi * x3;
        }
        largest.x = max(largest.x, store_logits(first, block_end, e0, e_end, sum_lo0, sum_hi0));
        largest.y = max(largest.y,
            store_logits(first + QUARTER, block_end, e0, e_end, sum_lo1, sum_hi1));
        largest.z = max(largest.z,
            store_logits(first + 2u * QUARTER, block_end, e0, e_end, sum_lo2, sum_hi2));
        largest.w = max(largest.w,
            store_logits(first + 3u * QUARTER, block_end, e0, e_end, sum_lo3, sum_hi3));
    }
    let at = quarter * BLOCK_TOKENS + lane % QUARTER;
    quarter_max[at] = largest.x;
    quarter_max[at + QUARTER] = largest.y;
    quarter_max[at + 2u * QUARTER] = largest.z;
    quarter_max[at + 3u * QUARTER] = largest.w;
}

// Token `token`'s logits for experts e0..e0 + 8 (those below e_end) plus the biases; returns
// the largest of the routed experts' (the shared gate's logit is no score).
fn store_logits(
    token: u32, block_end: u32, e0: u32, e_end: u32, lo: vec4<f32>, hi: vec4<f32>,
) -> f32 {
    var largest = bitcast<f32>(0xff7fffffu);
    if (token >= block_end) {
        return largest;
    }
    let p_base = token * router_rows();
    for (var j = 0u; j < 8u; j++) {
        let e = e0 + j;
        if (e < e_end) {
            let dot_e = select(lo[j % 4u], hi[j % 4u], j >= 4u);
            let logit = dot_e + router_bias[e / 4u][e % 4u];
            logits[p_base + e] = logit;
            if (e < params.num_experts) {
                largest = max(largest, logit);
            }
        }
    }
    return largest;
}

// The score p of a logit: σ(h), or its softmax given the token's largest logit and
// Σ exp(h − max) (the same expression wherever p is needed).
fn score_of(logit: f32, max_logit: f32, sum: f32) -> f32 {
    if (params.sigmoid_scores != 0u) {
        return 1.0 / (1.0 + exp(-logit));
    }
    return exp(logit - max_logit) / sum;
}

// What expert e is chosen by: p + score_bias[e] (the bias is zero when the layer has none).
fn selection_of(p_base: u32, e: u32, max_logit: f32, sum: f32) -> f32 {
    return score_of(logits[p_base + e], max_logit, sum) + score_bias[e / 4u][e % 4u];
}

// The groups a token may choose from, as bits (every bit without groups): the topk_group
// best by group score, ties to the lower group.
fn kept_groups(p_base: u32, max_logit: f32, sum: f32) -> u32 {
    let groups = params.n_group;
    if (groups == 0u) {
        return 0xffffffffu;
    }
    let size = params.num_experts / groups;
    var group_scores: array<f32, MAX_EXPERT_GROUPS>;
    for (var g = 0u; g < groups; g++) {
        // The group's best and second-best selection scores, in the CPU twin's order.
        // -f32::MAX, exactly (as bits: WebGPU's compilers refuse a decimal that rounds to it).
        var first = bitcast<f32>(0xff7fffffu);
        var second = first;
        for (var e = g * size; e < (g + 1u) * size; e++) {
            let s = selection_of(p_base, e, max_logit, sum);
            if (s > first) {
                second = first;
                first = s;
            } else if (s > second) {
                second = s;
            }
        }
        group_scores[g] = select(first + second, first, params.group_score_max != 0u);
    }
    var kept = 0u;
    for (var j = 0u; j < params.topk_group; j++) {
        var best_g = 0u;
        var found = false;
        for (var g = 0u; g < groups; g++) {
            let free = ((kept >> g) & 1u) == 0u;
            if (free && (!found || group_scores[g] > group_scores[best_g])) {
                best_g = g;
                found = true;
            }
        }
        kept |= 1u << best_g;
    }
    return kept;
}

// Scores, top-k and gates of one token (`index` in its block) from its logits; flags
// non-finite logits, and leaves the token's largest logit and Σ exp(h - max) in token_max
// and token_sum. Returns logsumexp².
fn route_one_token(token: u32, index: u32) -> f32 {
    let num_experts = params.num_experts;
    let p_base = token * router_rows();
    let stride = choices();

    let max_logit = max(max(quarter_max[index], quarter_max[index + BLOCK_TOKENS]),
        max(quarter_max[index + 2u * BLOCK_TOKENS], quarter_max[index + 3u * BLOCK_TOKENS]));
    // Stable softmax: exp(h - max) never overflows.
    var sum = 0.0;
    for (var e = 0u; e < num_experts; e++) {
        sum += exp(logits[p_base + e] - max_logit);
    }
    token_max[index] = max_logit;
    token_sum[index] = sum;
    let lse = max_logit + log(sum);
    if (!is_finite_bits(lse)) {
        atomicMin(&flags[0], token);
    }

    // Top-k: the j-th choice is the best expert of the kept groups strictly after the
    // (j-1)-th in the order (selection score descending, index ascending); the scan keeps
    // the first of equals.
    let kept = kept_groups(p_base, max_logit, sum);
    let group_size = num_experts / max(params.n_group, 1u);
    let top_k = params.top_k;
    var prev_s = 0.0;
    var prev_e = -1;
    var gate_sum = 0.0;
    for (var j = 0u; j < top_k; j++) {
        var best_e = 0u;
        var best_s = 0.0;
        var found = false;
        for (var e = 0u; e < num_experts; e++) {
            if (((kept >> (e / group_size)) & 1u) == 0u) {
                continue;
            }
            let s = selection_of(p_base, e, max_logit, sum);
            let after_prev = j == 0u || s < prev_s || (s == prev_s && i32(e) > prev_e);
            if (after_prev && (!found || s > best_s)) {
                best_s = s;
                best_e = e;
                found = true;
            }
        }
        let p = score_of(logits[p_base + best_e], max_logit, sum);
        routes[token * stride + j] = best_e;
        gates[token * stride + j] = p;
        gate_sum += p;
        prev_s = best_s;
        prev_e = i32(best_e);
        if (j == 0u) {
            route_prob_max[token] = p;
        }
    }
    let scaling = params.routed_scaling_factor;
    let normalize = params.normalize_top_k != 0u;
    for (var j = 0u; j < top_k; j++) {
        let g = gates[token * stride + j];
        gates[token * stride + j] = select(g, g / gate_sum, normalize) * scaling;
    }
    // The shared expert's slices, weighed by σ(x·gate) (the router's row num_experts) or 1.
    var shared_gate = 1.0;
    if (params.shared_gate != 0u) {
        shared_gate = 1.0 / (1.0 + exp(-logits[p_base + num_experts]));
    }
    for (var s = 0u; s < params.shared_experts; s++) {
        routes[token * stride + top_k + s] = num_experts + s;
        gates[token * stride + top_k + s] = shared_gate;
    }
    return lse * lse;
}

@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let block = workgroup_id.x + workgroup_id.y * num_workgroups.x;
    let block_start = block * BLOCK_TOKENS;
    if (block_start >= params.num_tokens) {
        return;
    }
    let block_end = min(block_start + BLOCK_TOKENS, params.num_tokens);
    let token = block_start + lane;

    block_logits(block_start, block_end, lane);
    storageBarrier();
    workgroupBarrier();

    var lse_sq = 0.0;
    if (token < block_end) {
        lse_sq = route_one_token(token, lane);
    }
    block_lse_sq[lane] = lse_sq;
    storageBarrier();
    workgroupBarrier();

    // Partial sums in token order (fixed, hence deterministic): one invocation per expert.
    let num_experts = params.num_experts;
    let sums_base = block * (num_experts + 1u);
    for (var e = lane; e < num_experts; e += BLOCK_TOKENS) {
        var sum = 0.0;
        for (var t = block_start; t < block_end; t++) {
            let i = t - block_start;
            sum += score_of(logits[t * router_rows() + e], token_max[i], token_sum[i]);
        }
        block_router_sums[sums_base + e] = sum;
    }
    if (lane == 0u) {
        var sum = 0.0;
        for (var i = 0u; i < block_end - block_start; i++) {
            sum += block_lse_sq[i];
        }
        block_router_sums[sums_base + num_experts] = sum;
    }
}
