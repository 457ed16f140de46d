//! Every WGSL source of the crate, in one `include_str!` registry, with the Rust mirrors
//! of the constants the shaders and the host must agree on.

/// A kernel's name (its file stem under `shaders/`) and WGSL source.
#[derive(Clone, Copy, Debug)]
pub struct ShaderSource {
    pub name: &'static str,
    pub source: &'static str,
}

macro_rules! shader {
    ($ident:ident, $name:literal) => {
        pub const $ident: ShaderSource = ShaderSource {
            name: $name,
            source: include_str!(concat!("../../../shaders/", $name, ".wgsl")),
        };
    };
    // A kernel with shared files prepended (WGSL has no includes): one module each.
    ($ident:ident, $name:literal, prepend $($shared:literal),+) => {
        pub const $ident: ShaderSource = ShaderSource {
            name: $name,
            source: concat!(
                $(include_str!(concat!("../../../shaders/", $shared, ".wgsl")),)+
                include_str!(concat!("../../../shaders/", $name, ".wgsl"))
            ),
        };
    };
}

shader!(STAGE_TOKENS, "stage_tokens");
shader!(ROUTE_TOKENS, "route_tokens");
shader!(COUNT_EXPERTS, "count_experts");
shader!(SCAN_EXPERT_OFFSETS, "scan_expert_offsets");
shader!(SCATTER_ASSIGNMENTS, "scatter_assignments");
// The expert matmuls share expert_matmul.wgsl: the accumulate of their K loops and the
// decoders of every stored weight format.
shader!(EXPERT_UP, "expert_up", prepend "expert_matmul", "activation");
shader!(EXPERT_DOWN, "expert_down", prepend "expert_matmul");
shader!(COMBINE_OUTPUTS, "combine_outputs");
shader!(REDUCE_ROUTER_STATS, "reduce_router_stats");

// The backward's kernels share their Params and parameter layout (backward_common), the
// two gate kernels the router's scores (gate_scores); its matmuls share the
// register-blocked core (grouped_matmul), the per-slot ones their tiles (backward_slots),
// the weight-gradient ones their steps over an expert's slots (slot_steps).
shader!(GATE_BACKWARD, "gate_backward", prepend "backward_common", "gate_scores");
shader!(GATE_INPUT_BACKWARD, "gate_input_backward", prepend "backward_common", "gate_scores");
shader!(EXPERT_HIDDEN_BACKWARD, "expert_hidden_backward", prepend "backward_common", "grouped_matmul", "backward_slots", "activation");
shader!(EXPERT_DOWN_BACKWARD, "expert_down_backward", prepend "backward_common", "grouped_matmul", "slot_steps");
shader!(EXPERT_UP_BACKWARD, "expert_up_backward", prepend "backward_common", "grouped_matmul", "slot_steps");
shader!(EXPERT_INPUT_BACKWARD, "expert_input_backward", prepend "backward_common", "grouped_matmul", "backward_slots");
shader!(EXPERT_BIAS_BACKWARD, "expert_bias_backward", prepend "backward_common");
shader!(ROUTER_BACKWARD, "router_backward", prepend "backward_common", "grouped_matmul");
shader!(COMBINE_BACKWARD, "combine_backward", prepend "backward_common", "grouped_matmul");
shader!(OPTIMIZER_STEP, "optimizer_step");
shader!(REFRESH_EXPERT_WEIGHTS, "refresh_expert_weights", prepend "refresh_params");
shader!(REFRESH_ROUTER_WEIGHTS, "refresh_router_weights", prepend "refresh_params");

/// All kernels of a forward, in the order a forward dispatches them.
pub const ALL: [ShaderSource; 9] = [
    STAGE_TOKENS,
    ROUTE_TOKENS,
    COUNT_EXPERTS,
    SCAN_EXPERT_OFFSETS,
    REDUCE_ROUTER_STATS,
    SCATTER_ASSIGNMENTS,
    EXPERT_UP,
    EXPERT_DOWN,
    COMBINE_OUTPUTS,
];

/// The kernels of training: the backward's in the order it dispatches them (after
/// gate_backward it stages dy with stage_tokens), then the optimizer step and the refresh
/// of the forward's weight textures.
pub const TRAINING: [ShaderSource; 12] = [
    GATE_BACKWARD,
    EXPERT_HIDDEN_BACKWARD,
    EXPERT_DOWN_BACKWARD,
    EXPERT_UP_BACKWARD,
    EXPERT_INPUT_BACKWARD,
    EXPERT_BIAS_BACKWARD,
    GATE_INPUT_BACKWARD,
    ROUTER_BACKWARD,
    COMBINE_BACKWARD,
    OPTIMIZER_STEP,
    REFRESH_EXPERT_WEIGHTS,
    REFRESH_ROUTER_WEIGHTS,
];

/// Invocations per workgroup of every training kernel.
pub const TRAINING_WORKGROUP: u32 = 64;

/// Tokens per block in stage_tokens, route_tokens, count_experts and scatter_assignments.
pub const BLOCK_TOKENS: u32 = 128;
/// The sides a matmul invocation's square output block may take (`4·QUADS` in the
/// shaders): 8 on GPUs, 16 on CPU adapters (see expert_up.wgsl).
pub const MATMUL_BLOCKS: [u32; 2] = [8, 16];
/// The rows an invocation's output block may take (`4·ROW_QUADS`), at most its side: short
/// blocks keep the row tiles of experts with few tokens from being mostly padding.
pub const MATMUL_BLOCK_ROWS: [u32; 3] = [4, 8, 16];
/// Invocations per workgroup of the expert matmuls (`LANES`) for each of MATMUL_BLOCKS.
pub const MATMUL_LANES: [u32; 2] = [64, 16];
/// The values the matmuls' `ROW_LANES` override may take (lanes along a tile's rows).
pub const ROW_LANES_CHOICES: [u32; 4] = [1, 2, 4, 8];
/// The histogram size of count_experts (workgroup memory), hence the most experts.
pub const MAX_EXPERTS: u32 = 2048;
/// assignment_slot's mark for a dropped assignment.
pub const DROPPED: u32 = u32::MAX;
/// Invocations of the single workgroup of scan_expert_offsets and reduce_router_stats.
pub const REDUCE_WORKGROUP: u32 = 256;
/// Invocations per workgroup of combine_outputs.
pub const COMBINE_WORKGROUP: u32 = 256;
