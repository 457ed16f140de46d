// refresh_params: what the two refresh kernels share (the shader registry prepends this
// file to refresh_expert_weights and refresh_router_weights): their Params, mirrored by
// gpu::params::RefreshParams, and their workgroup size.

struct RefreshParams {
    // The tensor's rows and columns (router: experts and d_model).
    rows: u32,
    cols: u32,
    // Texels per row quad (experts), or 4 × texels per row (router): cols rounded up to a
    // multiple of 4.
    width: u32,
    // Row quads per layer (experts).
    quads: u32,
    // The shard's first expert and its count (experts).
    first_expert: u32,
    num_experts: u32,
    // Offset of the tensor in `parameters`, in floats.
    tensor_at: u32,
    _pad0: u32,
}

const WORKGROUP: u32 = 64u;
