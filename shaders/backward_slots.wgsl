// backward_slots: which expert owns a slot of the expert segments, for the backward kernels
// that work per slot (the shader registry prepends it after backward_common; the kernel
// declares `expert_table`).
// expert_table (see scan_expert_offsets.wgsl): counts [N] | kept [N] | tile_start [N + 1] |
// n_dropped | tile_expert [tiles]. The expert owning `slot`, or ABSENT for a padding slot
// (past the last tile, or past its expert's kept rows).
fn slot_expert(slot: u32) -> u32 {
    let n = params.num_experts;
    let tile = slot / params.row_tile;
    if (tile >= expert_table[2u * n + n]) {
        return ABSENT;
    }
    let e = expert_table[3u * n + 2u + tile];
    let first = expert_table[2u * n + e] * params.row_tile;
    if (slot - first >= expert_table[n + e]) {
        return ABSENT;
    }
    return e;
}

// A block of 4 slots of one row tile (so of one expert): that expert (ABSENT when all 4 are
// padding) and which of the 4 are kept.
struct SlotBlock {
    expert: u32,
    valid: vec4<bool>,
}

fn slot_block(slot0: u32) -> SlotBlock {
    var block = SlotBlock(ABSENT, vec4<bool>(false));
    for (var i = 0u; i < 4u; i++) {
        let owner = slot_expert(slot0 + i);
        block.valid[i] = owner != ABSENT;
        if (owner != ABSENT) {
            block.expert = owner;
        }
    }
    return block;
}
