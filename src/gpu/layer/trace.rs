//! What a traced forward or backward reads back besides its results: the intermediate
//! buffers, for tests and debugging.

/// Intermediate buffers of one forward, read back for tests and debugging.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardTrace {
    /// `[T, k]`: the slot of every assignment, or `u32::MAX` if dropped.
    pub assignment_slot: Vec<u32>,
    /// `[slots]`: the token of every slot (padding slots hold stale values).
    pub slot_token: Vec<u32>,
    /// `[N + 1]`: first row tile of each expert's segment; slots are `tile·row_tile + i`.
    pub tile_start: Vec<u32>,
    /// Rows of a matmul tile in this forward.
    pub row_tile: u32,
    /// `[slots, F]`: expert hidden activations (valid rows only).
    pub hidden: Vec<f32>,
    /// `[slots, D]`: expert outputs (valid rows only).
    pub expert_out: Vec<f32>,
}

/// The buffers one backward read and wrote, read back for tests and debugging (slots:
/// the training forward's slot bound; only kept slots hold meaningful values). With a
/// shared expert, as the device holds them: its slices are experts N.. (and choices k..
/// of each token), its gate the router's row N (R = N + 1 below).
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardTrace {
    /// Of the training forward: `[T, R]` router logits (unwritten, so stale, after a
    /// pre-routed forward).
    pub logits: Vec<f32>,
    /// `[T, k]`: the slot of every assignment, or `u32::MAX` if dropped.
    pub assignment_slot: Vec<u32>,
    /// `[slots]`: the token of every slot.
    pub slot_token: Vec<u32>,
    /// counts [N] | kept [N] | tile_start [N + 1] | n_dropped | tile_expert [tiles].
    pub expert_table: Vec<u32>,
    /// Rows of a matmul tile: expert e's slots are `tile_start[e]·row_tile + [0, kept[e])`.
    pub row_tile: usize,
    /// `[slots, F]`: the expert hidden rows H.
    pub hidden: Vec<f32>,
    /// `[slots, D]`: the expert outputs O (before the gate).
    pub expert_out: Vec<f32>,
    /// Of the backward: `[T, R]` dL/dh of the logits (gate_backward); after a pre-routed
    /// forward, dL/dw of the caller's weights in each row's first k columns.
    pub d_logits: Vec<f32>,
    /// `[slots]`: each kept slot's gate scale s (dO = s·dy).
    pub slot_scale: Vec<f32>,
    /// `[T]`: π of a token that passed through, else 0.
    pub pass_scale: Vec<f32>,
    /// `[slots, F]`: the pre-activations a the training forward kept, and v when gated.
    pub pre_activations: Vec<f32>,
    pub pre_gates: Option<Vec<f32>>,
    /// `[slots, F]`: dA (expert_hidden_backward), and dV when gated.
    pub d_a: Vec<f32>,
    pub d_v: Option<Vec<f32>>,
    /// `[slots, D]`: each slot's input gradient (expert_input_backward; with `gate_on:
    /// input`, at the input g·x, before the gate's own factor).
    pub d_x_slot: Vec<f32>,
    /// With `gate_on: input`, the training forward's `[slots]` gate of each slot (1 for a
    /// shared expert's slices).
    pub slot_gate: Option<Vec<f32>>,
}
