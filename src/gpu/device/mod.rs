//! The bottom layer: wgpu plumbing that knows nothing of MoE — the adapter and device,
//! allocation, recording and read-back helpers, and the values a context's layers share.

pub mod allocate;
pub mod context;
pub mod encode;
pub mod readback;
pub mod shared_values;
