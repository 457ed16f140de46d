// refresh_expert_weights: after an optimizer step, rewrites one f32 expert tensor's texture
// (the forward's operand layout, expert_matmul.wgsl: texel (4·k4 + j, q) of layer e holds
// row 4q + j at k = 4·k4 .. 4·k4 + 4, as f32 bits; padding zero) from its shard's parameter
// buffer, whose rows are `width` floats apart (backward_common.wgsl). CPU twin:
// weight_textures::upload_weight_textures for f32.
//
// Dispatch: one invocation per texel of the shard's layers, workgroups of 64 in 2-D.
// Bindings: 0 params, 1 parameters as vec4s (rows padded, tensors on vec4s), 2 the tensor's
// quants plane (rgba32uint, write).

@group(0) @binding(0) var<uniform> params: RefreshParams;
@group(0) @binding(1) var<storage, read> parameters: array<vec4<f32>>;
@group(0) @binding(2) var quants: texture_storage_2d_array<rgba32uint, write>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = (workgroup_id.x + workgroup_id.y * num_workgroups.x) * WORKGROUP + lane;
    let per_layer = params.quads * params.width;
    if (index >= params.num_experts * per_layer) {
        return;
    }
    let layer = index / per_layer;
    let quad = index % per_layer / params.width;
    let texel = index % params.width;
    let row = 4u * quad + texel % 4u;
    let k = 4u * (texel / 4u);
    let expert = params.first_expert + layer;
    // A row's padding columns hold zeros in the parameter buffer too: whole vec4s move.
    var bits = vec4(0u);
    if (row < params.rows) {
        let row_at = params.tensor_at + (expert * params.rows + row) * params.width;
        bits = bitcast<vec4<u32>>(parameters[(row_at + k) / 4u]);
    }
    textureStore(quants, vec2(texel, quad), layer, bits);
}
