// refresh_router_weights: after an optimizer step, rewrites the router texture (route_tokens'
// operand: texel (d4, e) holds Wr[e, 4·d4 .. 4·d4 + 4], zero-padded) from the flat parameter
// buffer. CPU twin: buffers::router_texture.
//
// Dispatch: one invocation per texel, workgroups of 64 in 2-D.
// Bindings: 0 params, 1 parameters, 2 the router texture (rgba32float, write).

@group(0) @binding(0) var<uniform> params: RefreshParams;
@group(0) @binding(1) var<storage, read> parameters: array<f32>;
@group(0) @binding(2) var router: texture_storage_2d<rgba32float, write>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let index = (workgroup_id.x + workgroup_id.y * num_workgroups.x) * WORKGROUP + lane;
    let texels_per_row = params.width / 4u;
    if (index >= params.rows * texels_per_row) {
        return;
    }
    let expert = index / texels_per_row;
    let texel = index % texels_per_row;
    var values = vec4(0.0);
    for (var c = 0u; c < 4u; c++) {
        let d = 4u * texel + c;
        if (d < params.cols) {
            values[c] = parameters[params.tensor_at + expert * params.cols + d];
        }
    }
    textureStore(router, vec2(texel, expert), values);
}
