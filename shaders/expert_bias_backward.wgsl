// expert_bias_backward: the experts' bias gradients, each a sum over the expert's own kept
// slots in slot order (no atomics, the same bits on every run):
//   db1[e, f] = Σ dA[slot, f],   db3[e, f] = Σ dV[slot, f] (gated),   db2[e, d] = Σ s·dy[t, d]
// A shared expert's slices after the first (experts past routed_experts) hold no b2 of
// their own (the shared b2 is added once, by the first): their db2 is 0, so that it stays 0.
// CPU twin: cpu_backward_kernels::expert_bias_backward.
//
// Dispatch: once per weight shard, one invocation per expert of the shard and 4 bias
// elements (b1's F4 / 4 quads, b3's, then b2's D4 / 4), workgroups of 64 in 2-D; absent
// biases return at once.
// Bindings: 0 params, 1 dy_rows texels [layers][height][D4 / 4], 2 slot_token [slots],
// 3 expert_table, 4 slot_scale [slots], 5 d_a [slots, F4] as vec4s, 6 d_v [slots, F4] (gated),
// 7 shard (its ShardParams), 8 the shard's gradients as vec4s (bias rows padded to F4 and D4:
// backward_common.wgsl).

@group(0) @binding(0) var<uniform> params: BackwardParams;
@group(0) @binding(1) var dy_rows: texture_2d_array<f32>;
@group(0) @binding(2) var<storage, read> slot_token: array<u32>;
@group(0) @binding(3) var<storage, read> expert_table: array<u32>;
@group(0) @binding(4) var<storage, read> slot_scale: array<f32>;
@group(0) @binding(5) var<storage, read> d_a: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> d_v: array<vec4<f32>>;
@group(0) @binding(7) var<uniform> shard: ShardParams;
@group(0) @binding(8) var<storage, read_write> gradients: array<vec4<f32>>;

// `value`, plus what the earlier chunks of the batch left at `at` (accumulate).
fn accumulated(at: u32, value: vec4<f32>) -> vec4<f32> {
    if (params.accumulate != 0u) {
        return gradients[at] + value;
    }
    return value;
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = linear_index(workgroup_id, num_workgroups, lane);
    let n = params.num_experts;
    let d_model = params.d_model;
    let d_ff = params.d_ff;
    let f_quads = params.hidden_stride / 4u;
    let d_quads = (d_model + 3u) / 4u;
    let per_expert = 2u * f_quads + d_quads;
    if (index >= shard.num_experts * per_expert) {
        return;
    }
    let local = index / per_expert;
    let e = shard.first_expert + local;
    let quad = index % per_expert;
    let first = expert_table[2u * n + e] * params.row_tile;
    let rows = expert_table[n + e];
    var sum = vec4(0.0);
    if (quad < 2u * f_quads) {
        let of_b3 = quad >= f_quads;
        let bias_at = select(shard.b1_at, shard.b3_at, of_b3);
        if (bias_at == ABSENT) {
            return;
        }
        let q = quad % f_quads;
        for (var r = 0u; r < rows; r++) {
            let at = (first + r) * f_quads + q;
            if (of_b3) {
                sum += d_v[at];
            } else {
                sum += d_a[at];
            }
        }
        let at = bias_at / 4u + local * f_quads + q;
        gradients[at] = accumulated(at, sum);
        return;
    }
    if (shard.b2_at == ABSENT) {
        return;
    }
    let q = quad - 2u * f_quads;
    let height = textureDimensions(dy_rows).y;
    let b2_rows = select(rows, 0u, e > params.routed_experts);
    for (var r = 0u; r < b2_rows; r++) {
        let slot = first + r;
        let token = slot_token[slot];
        sum += slot_scale[slot] * textureLoad(dy_rows, vec2(q, token % height), token / height, 0);
    }
    let at = shard.b2_at / 4u + local * d_quads + q;
    gradients[at] = accumulated(at, sum);
}
