//! The fourth layer: what lives on the device between calls — the weights in their stored
//! formats (shards, textures), a forward's workspace (scratch buffers, bind groups, the
//! pool lease) and training's state (flat parameters and gradients, the backward's
//! scratch, the optimizer's moments, the prepared weight refresh).

pub mod backward_scratch;
pub mod optimizer_state;
pub mod scratch;
pub mod training;
pub mod weight_refresh;
pub mod weight_textures;
pub mod weights;
pub mod workspace;
