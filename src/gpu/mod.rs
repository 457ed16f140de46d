//! The GPU side: device context, kernels, buffers and the layer that runs them.

pub mod buffers;
pub mod context;
pub mod kernels;
pub mod layer;
pub mod params;
pub mod plan;
pub mod readback;
pub mod shaders;
pub mod weight_textures;

pub use context::{AdapterSummary, GpuContext};
pub use layer::{ForwardTrace, LayerOptions, MoeLayer, StatisticsLayout};
