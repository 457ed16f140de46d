// scan_expert_offsets: from the block histograms, each block's rank offset inside its
// group and expert, the kept count per group and expert under capacity, each expert's
// routed and kept totals, expert segments padded to the matmul row tile, the
// tile→expert table, and the indirect dispatch arguments of the expert matmuls.
//
// Dispatch: ONE workgroup of 256 invocations (the data are small: blocks·k·N counts).
// Bindings: 0 params, 1 block_counts [blocks, k, N], 2 block_offsets [blocks, k, N],
// 3 group_kept_prefix [groups, N] (kept in earlier groups), 4 expert_table (layout below),
// 5 dispatch_args [shards, 2, 3], 6 shard_first_expert [shards + 1].
//
// expert_table layout (u32): counts [N] | kept [N] | tile_start [N + 1] | n_dropped [1] |
// tile_expert [max_tiles]. Expert e's rows are slots tile_start[e]·row_tile + [0, kept[e]).

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

const WORKGROUP: u32 = 256u;

@group(0) @binding(0) var<uniform> params: AssignParams;
@group(0) @binding(1) var<storage, read> block_counts: array<u32>;
@group(0) @binding(2) var<storage, read_write> block_offsets: array<u32>;
@group(0) @binding(3) var<storage, read_write> group_kept_prefix: array<u32>;
@group(0) @binding(4) var<storage, read_write> expert_table: array<u32>;
@group(0) @binding(5) var<storage, read_write> dispatch_args: array<u32>;
@group(0) @binding(6) var<storage, read> shard_first_expert: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lane: u32) {
    let num_experts = params.num_experts;
    let top_k = params.top_k;
    let num_groups = params.num_blocks / params.chunks_per_group;
    let counts_at = 0u;
    let kept_at = num_experts;
    let tile_start_at = 2u * num_experts;
    let n_dropped_at = 3u * num_experts + 1u;
    let tile_expert_at = 3u * num_experts + 2u;

    // Per expert, walk its groups; inside a group the priority order is choice rank
    // first, then token position, i.e. (choice, chunk) in lexicographic order.
    for (var e = lane; e < num_experts; e += WORKGROUP) {
        var routed = 0u;
        var kept = 0u;
        for (var group = 0u; group < num_groups; group++) {
            var running = 0u;
            for (var choice = 0u; choice < top_k; choice++) {
                for (var chunk = 0u; chunk < params.chunks_per_group; chunk++) {
                    let block = group * params.chunks_per_group + chunk;
                    let at = (block * top_k + choice) * num_experts + e;
                    block_offsets[at] = running;
                    running += block_counts[at];
                }
            }
            group_kept_prefix[group * num_experts + e] = kept;
            kept += min(running, select(params.capacity, 0xffffffffu, e >= params.routed_experts));
            routed += running;
        }
        expert_table[counts_at + e] = routed;
        expert_table[kept_at + e] = kept;
    }
    storageBarrier();
    workgroupBarrier();

    // Exclusive scan of padded segment lengths (in row tiles); N is small, one lane does it.
    if (lane == 0u) {
        var tiles = 0u;
        var dropped = 0u;
        for (var e = 0u; e < num_experts; e++) {
            expert_table[tile_start_at + e] = tiles;
            let kept = expert_table[kept_at + e];
            tiles += (kept + params.row_tile - 1u) / params.row_tile;
            dropped += expert_table[counts_at + e] - kept;
        }
        expert_table[tile_start_at + num_experts] = tiles;
        expert_table[n_dropped_at] = dropped;
        // One (x, y, z) triple per shard and projection: y counts the shard's row tiles.
        for (var shard = 0u; shard < params.num_shards; shard++) {
            let first_tile = expert_table[tile_start_at + shard_first_expert[shard]];
            let end_tile = expert_table[tile_start_at + shard_first_expert[shard + 1u]];
            let at = shard * 6u;
            dispatch_args[at] = params.up_tiles_x;
            dispatch_args[at + 1u] = end_tile - first_tile;
            dispatch_args[at + 2u] = 1u;
            dispatch_args[at + 3u] = params.down_tiles_x;
            dispatch_args[at + 4u] = end_tile - first_tile;
            dispatch_args[at + 5u] = 1u;
        }
    }
    storageBarrier();
    workgroupBarrier();

    for (var e = lane; e < num_experts; e += WORKGROUP) {
        let end = expert_table[tile_start_at + e + 1u];
        for (var tile = expert_table[tile_start_at + e]; tile < end; tile++) {
            expert_table[tile_expert_at + tile] = e;
        }
    }
}
