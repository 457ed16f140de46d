// reduce_router_stats: route_prob_sum[e] = Σ_t p[t, e], the Switch aux loss
// N·Σ_e (counts[e]/T)·(route_prob_sum[e]/T) and the z-loss mean_t lse_t², from the
// per-block partial sums of route_tokens. Each sum is a fixed-shape tree (strided
// per-lane sums, then halving in workgroup memory): deterministic, no float atomics.
//
// Dispatch: ONE workgroup of 256 invocations.
// Bindings: 0 params, 1 block_router_sums [blocks, N + 1], 2 expert_table (counts first),
// 3 router_stats [N + 2]: route_prob_sum [N], aux_loss, z_loss.

struct StatsParams {
    num_tokens: u32,
    num_experts: u32,
    num_blocks: u32,
    _pad0: u32,
}

const WORKGROUP: u32 = 256u;

@group(0) @binding(0) var<uniform> params: StatsParams;
@group(0) @binding(1) var<storage, read> block_router_sums: array<f32>;
@group(0) @binding(2) var<storage, read> expert_table: array<u32>;
@group(0) @binding(3) var<storage, read_write> router_stats: array<f32>;

var<workgroup> partial: array<f32, WORKGROUP>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lane: u32) {
    let num_experts = params.num_experts;
    let stride = num_experts + 1u;
    let num_tokens = f32(params.num_tokens);
    // Columns 0..N-1 are the experts' probability sums, column N the lse² sums.
    for (var column = 0u; column <= num_experts; column++) {
        var sum = 0.0;
        for (var block = lane; block < params.num_blocks; block += WORKGROUP) {
            sum += block_router_sums[block * stride + column];
        }
        partial[lane] = sum;
        workgroupBarrier();
        for (var half = WORKGROUP / 2u; half > 0u; half /= 2u) {
            if (lane < half) {
                partial[lane] += partial[lane + half];
            }
            workgroupBarrier();
        }
        if (lane == 0u) {
            if (column < num_experts) {
                router_stats[column] = partial[0];
            } else {
                router_stats[num_experts + 1u] = partial[0] / num_tokens;
            }
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        var aux = 0.0;
        for (var e = 0u; e < num_experts; e++) {
            aux += (f32(expert_table[e]) / num_tokens) * (router_stats[e] / num_tokens);
        }
        router_stats[num_experts] = f32(num_experts) * aux;
    }
}
