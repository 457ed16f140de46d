// count_experts: per block and choice rank, how many assignments go to each expert
// (a histogram built with atomicAdd in workgroup memory; integer sums do not depend on
// the order of the atomics, so the counts are deterministic).
//
// Blocks tile each capacity group: block b covers tokens [g·G + c·BLOCK_TOKENS, ...) of
// group g = b / chunks_per_group, chunk c = b % chunks_per_group, never crossing a group.
// Dispatch: one workgroup per block (2-D layout), one invocation per token.
// Bindings: 0 params, 1 routes [T, k], 2 block_counts [blocks, k, N].

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
// Workgroup memory for the histogram: 8 KiB, within WebGPU's guaranteed 16 KiB.
const MAX_EXPERTS: u32 = 2048u;

@group(0) @binding(0) var<uniform> params: AssignParams;
@group(0) @binding(1) var<storage, read> routes: array<u32>;
@group(0) @binding(2) var<storage, read_write> block_counts: array<u32>;

var<workgroup> histogram: array<atomic<u32>, MAX_EXPERTS>;

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
    let group = block / params.chunks_per_group;
    let chunk = block % params.chunks_per_group;
    let group_end = (group + 1u) * params.group_size;
    let token = group * params.group_size + chunk * BLOCK_TOKENS + lane;
    let num_experts = params.num_experts;
    let top_k = params.top_k;

    for (var choice = 0u; choice < top_k; choice++) {
        for (var e = lane; e < num_experts; e += BLOCK_TOKENS) {
            atomicStore(&histogram[e], 0u);
        }
        workgroupBarrier();
        if (token < group_end) {
            atomicAdd(&histogram[routes[token * top_k + choice]], 1u);
        }
        workgroupBarrier();
        let out_base = (block * top_k + choice) * num_experts;
        for (var e = lane; e < num_experts; e += BLOCK_TOKENS) {
            block_counts[out_base + e] = atomicLoad(&histogram[e]);
        }
        workgroupBarrier();
    }
}
