//! The top layer: `MoeLayer`, the one place that holds every resource and knows the order
//! of the phases — construction, inference (in chunks beyond a device limit), the encoded forward, the experts
//! alone, training and optimizer steps. The host conveniences wrap the passes' encoders.

mod backward;
mod chunked_training;
mod encoded;
mod experts;
mod inference;
mod moe_layer;
mod optimizer;
#[cfg(not(target_arch = "wasm32"))]
mod profile;
mod trace;
mod training;

pub use moe_layer::{LayerOptions, MoeLayer};
#[cfg(not(target_arch = "wasm32"))]
pub use profile::KernelTime;
pub use trace::{BackwardTrace, ForwardTrace};
