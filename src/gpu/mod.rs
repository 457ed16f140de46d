//! The GPU side, in layers whose imports point one way (down), as `tests/layering.rs`
//! checks:
//!
//! 1. `device` — adapter and device, allocation, recording and read-back helpers;
//! 2. `kernels` — shader registry, `Params` mirrored from the WGSL, pipelines;
//! 3. `plan` — every size, grid, tile choice and `Params` value, from (config, shape, limits);
//! 4. `resources` — weights, a forward's workspace, training's state on the device;
//! 5. `passes` — forward, backward, optimizer and refresh, each a free function recording
//!    into a `CommandEncoder` from explicit resources; passes never import each other;
//! 6. `layer` — `MoeLayer`, the only code that knows the order of the phases.

pub mod device;
pub mod kernels;
pub mod layer;
pub(crate) mod passes;
pub mod plan;
pub mod resources;

pub use device::context::{AdapterSummary, GpuContext};
#[cfg(not(target_arch = "wasm32"))]
pub use layer::KernelTime;
pub use layer::{BackwardTrace, ForwardTrace, LayerOptions, MoeLayer};
pub use plan::optimizer::{AdamWState, Optimizer};
pub use plan::sizes::StatisticsLayout;

// The module paths of earlier versions, kept working.
pub use device::{context, readback};
pub use kernels::{params, shaders};
pub use plan::parameters;
pub use resources::weight_textures;

/// GPU memory helpers and types under their earlier path (now in `device::allocate`,
/// `plan::sizes`, `resources::weights` and `resources::scratch`).
pub mod buffers {
    pub use super::device::allocate::{
        array_layers, max_x_rows, padded_to_vec4, storage_buffer, storage_buffer_init,
        texture_array, uniform_buffer,
    };
    pub use super::plan::sizes::{readback_len, ScratchSizes};
    pub use super::resources::scratch::Scratch;
    pub use super::resources::weights::{GpuWeights, WeightShard};
}
