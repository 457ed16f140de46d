//! The fifth layer: the passes, each a free function that records into a
//! `CommandEncoder` from resources given explicitly (never the layer). Passes never import
//! each other: only `layer` knows their order.

pub(crate) mod backward;
pub(crate) mod forward;
pub(crate) mod optimizer;
pub(crate) mod refresh;
