//! switch-moe: a Mixture-of-Experts layer (the Switch Transformer's routed FFN, and top-k
//! MoE) as WGSL compute shaders on wgpu, with a CPU reference that is its specification.
//!
//! The GPU forward runs a constant number of dispatches whatever the number of experts:
//! routing, counting, a scan, a scatter, ONE grouped matmul over all experts for each of
//! the two expert projections, and the combine. See README.md for the architecture.

pub mod activation;
pub mod config;
pub mod cpu_backward;
pub mod cpu_backward_kernels;
pub mod cpu_math;
pub mod cpu_reference;
pub mod cpu_routing;
pub mod cpu_shared_expert;
pub mod error;
pub mod formats;
#[cfg(not(target_arch = "wasm32"))]
pub mod forward_files;
pub mod gguf;
pub mod gguf_config;
pub mod gpu;
pub mod gradients;
pub mod hf_config;
pub mod output;
pub mod rng;
pub mod tensor_io;
#[cfg(target_arch = "wasm32")]
pub mod web;
pub mod weights;

pub use config::{
    Activation, DropPolicy, ExpertGroups, GateOn, GroupScore, HiddenUnit, MoeConfig, Naming,
    Router, RouterScore,
};
pub use cpu_backward::LossCoefficients;
pub use error::{MoeError, Result};
pub use formats::{ExpertMatrices, WeightFormat};
pub use gpu::{GpuContext, LayerOptions, MoeLayer, Optimizer};
pub use gradients::{ExpertsGradients, Gradients};
pub use output::MoeOutput;
pub use weights::{LayerShape, MoeWeights};
