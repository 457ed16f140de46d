// stage_tokens: copies x into the rgba32float texture array that route_tokens (the router
// logits) and expert_up read it from, and flags non-finite input. On CPU adapters a storage
// load is a loop over the SIMD lanes while a texel fetch is a vector gather: here x goes
// through storage loads once, rather than once per pass of route_tokens' logits.
//
// Dispatch: one workgroup per block of BLOCK_TOKENS consecutive tokens, one invocation per
// token; workgroups laid out in 2-D (x + y·num_workgroups.x) so that any T fits.
// Bindings: 0 params (route_tokens' RouteParams), 1 x [T, D] (whole vec4s), 2 flags [1]
// (atomicMin of the first token with a non-finite value), 3 x_rows [layers][height][D4 / 4]
// texels, zero-padded, token t at row t % height of layer t / height.

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

@group(0) @binding(0) var<uniform> params: RouteParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> flags: array<atomic<u32>>;
@group(0) @binding(3) var x_rows: texture_storage_2d_array<rgba32float, write>;

// Checks the bit pattern rather than comparing floats, which a compiler may assume finite.
fn is_finite_bits(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

// x[row_at + k .. row_at + k + 4], zeros past the row's end (k is a multiple of 4); an
// unaligned row (D % 4 != 0) is shifted out of the two aligned vec4s around it.
fn x_vec4(row_at: u32, k: u32, d_model: u32) -> vec4<f32> {
    let at = row_at + k;
    let lo = x[at / 4u];
    if (d_model % 4u == 0u) {
        return lo;
    }
    let hi = x[at / 4u + 1u];
    let shift = at % 4u;
    var v = select(lo, vec4(lo.yzw, hi.x), shift == 1u);
    v = select(v, vec4(lo.zw, hi.xy), shift == 2u);
    v = select(v, vec4(lo.w, hi.xyz), shift == 3u);
    return select(vec4(0.0), v, vec4(k) + vec4(0u, 1u, 2u, 3u) < vec4(d_model));
}

@compute @workgroup_size(BLOCK_TOKENS)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let token = (workgroup_id.x + workgroup_id.y * num_workgroups.x) * BLOCK_TOKENS + lane;
    if (token >= params.num_tokens) {
        return;
    }
    let d_model = params.d_model;
    let x_base = token * d_model;
    let height = textureDimensions(x_rows).y;
    let row = token % height;
    let layer = token / height;
    var finite = true;
    for (var k4 = 0u; k4 < (d_model + 3u) / 4u; k4++) {
        let v = x_vec4(x_base, 4u * k4, d_model);
        textureStore(x_rows, vec2(k4, row), layer, v);
        finite = finite && is_finite_bits(v.x) && is_finite_bits(v.y) && is_finite_bits(v.z)
            && is_finite_bits(v.w);
    }
    if (!finite) {
        atomicMin(&flags[0], token);
    }
}
