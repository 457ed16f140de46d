//! The GPU side: device context, kernels, buffers and the layer that runs them.

mod backward;
mod backward_passes;
pub mod buffers;
mod chunks;
pub mod context;
mod encoded;
mod experts;
mod forward;
pub mod kernels;
pub mod layer;
mod optimizer;
pub mod parameters;
pub mod params;
pub mod plan;
pub mod readback;
mod refresh;
pub mod shaders;
pub mod weight_textures;
mod workspace;

pub use backward::BackwardTrace;
pub use context::{AdapterSummary, GpuContext};
pub use forward::{ForwardTrace, StatisticsLayout};
pub use layer::{LayerOptions, MoeLayer};
pub use optimizer::{AdamWState, Optimizer};
