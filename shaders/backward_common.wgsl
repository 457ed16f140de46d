// backward_common: what every kernel of the backward shares (the shader registry prepends
// this file to each): their one Params struct, the flat parameter and gradient layout, and
// the invocation index of their 2-D grids. See src/gpu/passes/backward.rs for the order of the
// dispatches and cpu_backward.rs for the sums they compute.
//
// The layer's trainable tensors (and their gradients, laid out alike) live in one f32
// buffer for the router — router.weight [R, D] at router_weight_at, router.bias [R] at
// router_bias_at (R = router_rows) — and one per weight shard for its experts: w1 [n, F, D4], b1 [n, F4],
// w2 [n, D, F4], b2 [n, D4], w3 [n, F, D4], b3 [n, F4] of the shard's n experts at the `_at`
// offsets of its ShardParams (in floats, multiples of 4), every row zero-padded to whole
// vec4s (D4, F4) so that gradients go out four at a time; an absent tensor's offset is
// ABSENT. Every
// gradient element is written by one invocation that sums its terms in a fixed order: no
// atomics, the same bits on every run.

struct BackwardParams {
    num_tokens: u32,
    d_model: u32,
    d_ff: u32,
    num_experts: u32,
    top_k: u32,
    row_tile: u32,
    max_slots: u32,
    gated: u32,
    scale_by_prob: u32,
    normalize_top_k: u32,
    pass_through: u32,
    hidden_stride: u32,
    aux_coef: f32,
    z_coef: f32,
    router_weight_at: u32,
    router_bias_at: u32,
    // 1: the training forward was forward_experts (the caller's routes and weights, no
    // router): gate_backward writes dL/dw, and the router's terms are left out.
    pre_routed: u32,
    // The tokens of the whole batch (the aux and z losses' T): num_tokens unless the batch
    // runs in chunks.
    loss_tokens: u32,
    // 1 for every chunk of a batch after the first: the gradient kernels add to what the
    // earlier chunks wrote (in chunk order, so the same bits on every run).
    accumulate: u32,
    // 1: the router's scores are sigmoids (route_tokens' sigmoid_scores).
    sigmoid_scores: u32,
    routed_scaling_factor: f32,
    // The router's rows (and d_logits' columns): the routed experts, then the shared
    // expert's gate when it has one; the routed experts (the rest of num_experts are the
    // shared expert's slices); each token's routed choices (the rest of top_k are those
    // slices).
    router_rows: u32,
    routed_experts: u32,
    routed_top_k: u32,
}

// A weight shard's experts in its parameter (gradient) buffer: the first and how many, and
// where each tensor starts (floats; ABSENT when the layer has none).
struct ShardParams {
    first_expert: u32,
    num_experts: u32,
    w1_at: u32,
    b1_at: u32,
    w2_at: u32,
    b2_at: u32,
    w3_at: u32,
    b3_at: u32,
}

const ABSENT: u32 = 0xffffffffu;
const DROPPED: u32 = 0xffffffffu;
const WORKGROUP: u32 = 64u;

// Where four tokens' rows are in a texture of token rows `height` rows tall (x's or dy's,
// as stage_tokens lays them out: token t at row t % height of layer t / height); one layer
// holds every token of the batch unless it is taller than a texture, which saves the
// division.
struct TokenTexels {
    row: vec4<u32>,
    layer: vec4<u32>,
}

fn token_texels(tokens: vec4<u32>, height: u32) -> TokenTexels {
    if (params.num_tokens <= height) {
        return TokenTexels(tokens, vec4(0u));
    }
    return TokenTexels(tokens % height, tokens / height);
}

// The linear index of an invocation in a 2-D grid of WORKGROUP-wide workgroups
// (x + y·num_workgroups.x, as device::encode::grid_2d lays them out).
fn linear_index(workgroup_id: vec3<u32>, num_workgroups: vec3<u32>, lane: u32) -> u32 {
    return (workgroup_id.x + workgroup_id.y * num_workgroups.x) * WORKGROUP + lane;
}
