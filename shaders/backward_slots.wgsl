// backward_slots: where an invocation's block of the backward's per-slot matmuls lies
// (the shader registry prepends it after backward_common and grouped_matmul to
// expert_hidden_backward and expert_input_backward; the kernel declares `expert_table` and
// `shard`). Their rows are the training forward's slots, in its row tiles of one weight
// shard, dispatched with its indirect arguments as expert_up and expert_down were.
// expert_table (see scan_expert_offsets.wgsl): counts [N] | kept [N] | tile_start [N + 1] |
// n_dropped | tile_expert [tiles].

// expert_up's and expert_down's Params of one weight shard (mirrored by
// gpu::params::ExpertParams), which the kernel binds as `shard`.
struct ExpertParams {
    d_model: u32,
    d_ff: u32,
    num_experts: u32,
    shard_first_expert: u32,
    shard_num_experts: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// The expert owning a workgroup's row tile, its layer in the shard's weight textures, the
// end of its kept slots, and the invocation's block origin (first slot, first column).
struct SlotTile {
    expert: u32,
    layer: u32,
    rows_end: u32,
    origin: vec2<u32>,
}

fn slot_tile(workgroup_id: vec3<u32>, lane: u32) -> SlotTile {
    let n = params.num_experts;
    let row_tile = ROW_LANES * 4u * ROW_QUADS;
    let tile = expert_table[2u * n + shard.shard_first_expert] + workgroup_id.y;
    let expert = expert_table[3u * n + 2u + tile];
    let rows_end = expert_table[2u * n + expert] * row_tile + expert_table[n + expert];
    return SlotTile(expert, expert - shard.shard_first_expert, rows_end,
        block_origin(tile, workgroup_id.x, lane));
}
