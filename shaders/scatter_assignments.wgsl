// scatter_assignments: the slot of every kept assignment in the expert-major layout, and
// the token of every slot. An assignment's rank inside its group and expert is its block's
// offset (from the scan) plus the number of earlier tokens of its block with the same
// expert and choice rank (counted in workgroup memory): a stable counting sort, so the
// result never depends on GPU scheduling. Ranks at or beyond the capacity are dropped.
//
// Dispatch: one workgroup per block (as count_experts), one invocation per token.
// With GATE_INPUT (gate_on: input, Llama 4) it also gives every slot its routed choice's
// gate, which expert_up multiplies the expert's input by (1 for a shared expert's slice).
// Bindings: 0 params, 1 routes [T, k], 2 block_offsets [blocks, k, N],
// 3 group_kept_prefix [groups, N], 4 expert_table, 5 slot_token [slots],
// 6 assignment_slot [T, k] (slot, or DROPPED), 7 gates [T, k], 8 slot_gate [slots].

struct AssignParams {
    num_tokens: u32,
    num_experts: u32,
    top_k: u32,
    group_size: u32,
    chunks_per_group: u32,
    num_blocks: u32,
    capacity: u32,
    row_tile: u32,
    num_shards: u32,
    up_tiles_x: u32,
    down_tiles_x: u32,
    // Experts under capacity: the shared expert's slices after them never drop.
    routed_experts: u32,
}

const BLOCK_TOKENS: u32 = 128u;
override GATE_INPUT: bool = false;
const DROPPED: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> params: AssignParams;
@group(0) @binding(1) var<storage, read> routes: array<u32>;
@group(0) @binding(2) var<storage, read> block_offsets: array<u32>;
@group(0) @binding(3) var<storage, read> group_kept_prefix: array<u32>;
@group(0) @binding(4) var<storage, read> expert_table: array<u32>;
@group(0) @binding(5) var<storage, read_write> slot_token: array<u32>;
@group(0) @binding(6) var<storage, read_write> assignment_slot: array<u32>;
@group(0) @binding(7) var<storage, read> gates: array<f32>;
@group(0) @binding(8) var<storage, read_write> slot_gate: array<f32>;

var<workgroup> block_routes: array<u32, BLOCK_TOKENS>;

@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let block = workgroup_id.x + workgroup_id.y * num_workgroups.x;
    if (block >= params.num_blocks) {
        return;
    }
    let num_experts = params.num_experts;
    let top_k = params.top_k;
    let group = block / params.chunks_per_group;
    let chunk = block % params.chunks_per_group;
    let token = group * params.group_size + chunk * BLOCK_TOKENS + lane;
    let in_group = token < (group + 1u) * params.group_size;
    let tile_start_at = 2u * num_experts;

    for (var choice = 0u; choice < top_k; choice++) {
        var expert = DROPPED;
        if (in_group) {
            expert = routes[token * top_k + choice];
        }
        block_routes[lane] = expert;
        workgroupBarrier();
        if (in_group) {
            var rank = block_offsets[(block * top_k + choice) * num_experts + expert];
            for (var i = 0u; i < lane; i++) {
                rank += select(0u, 1u, block_routes[i] == expert);
            }
            var slot = DROPPED;
            let capacity = select(params.capacity, 0xffffffffu, expert >= params.routed_experts);
            if (rank < capacity) {
                slot = expert_table[tile_start_at + expert] * params.row_tile
                    + group_kept_prefix[group * num_experts + expert] + rank;
                slot_token[slot] = token;
                if (GATE_INPUT) {
                    let routed = expert < params.routed_experts;
                    slot_gate[slot] = select(1.0, gates[token * top_k + choice], routed);
                }
            }
            assignment_slot[token * top_k + choice] = slot;
        }
        workgroupBarrier();
    }
}
