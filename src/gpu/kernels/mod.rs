//! The second layer: every kernel the layer runs — the shader registry (with the shared
//! WGSL prepended), the `Params` structs mirrored from the WGSL, the matmul tile shapes,
//! and the pipelines with their bind group layouts, shared by the layers of a context that
//! would build the same ones.

pub mod forward;
pub mod params;
pub mod pipeline;
pub mod shaders;
pub mod tiling;
pub mod training;

pub use forward::{ExpertMatmuls, ForwardKey, Kernels, MatmulPipelines};
pub use pipeline::{bind_buffers, bind_resources, Binding, Kernel};
pub use tiling::MatmulTiling;
pub use training::{TrainingKernels, TrainingKey};
