//! The third layer: every size, grid, tile choice and `Params` value of a forward, a
//! backward and an optimizer step, from (config, shape, device limits). Pure arithmetic on
//! the host: nothing here touches the device.

pub mod backward;
pub mod forward;
pub mod optimizer;
pub mod parameter_shards;
pub mod parameters;
pub mod shared_experts;
pub mod sizes;
pub mod tiling;

pub use crate::gpu::device::encode::{div_ceil, grid_2d};
pub use crate::gpu::kernels::tiling::MatmulTiling;
pub use backward::{backward_params, weight_gradient_tiling, BackwardGrids, BatchPart};
pub use forward::{ForwardGrids, ForwardPlan, KernelParams, Routing};
pub use optimizer::{AdamWState, Optimizer};
pub use parameter_shards::{ExpertOffsets, ParameterShard, ParameterShards};
pub use parameters::ParameterLayout;
pub use sizes::{readback_len, ScratchSizes, StatisticsLayout};
