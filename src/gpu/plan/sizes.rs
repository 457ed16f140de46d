//! The lengths of every buffer a forward uses: the workspace's scratch (a forward fits a
//! workspace when each is at most the allocated one), the read-back, and the statistics of
//! an encoded forward in the caller's buffer.

use crate::gpu::device::allocate::padded_to_vec4;
use crate::gpu::plan::forward::ForwardPlan;
use crate::weights::LayerShape;

/// Lengths (in 4-byte elements) of every scratch buffer; a forward fits the scratch when
/// each of its lengths is at most the allocated one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScratchSizes {
    pub x: usize,
    pub logits: usize,
    pub assignments: usize,
    pub tokens: usize,
    pub block_router_sums: usize,
    pub block_counts: usize,
    pub group_kept_prefix: usize,
    pub expert_table: usize,
    pub slots: usize,
    pub hidden: usize,
    pub expert_out: usize,
    /// The pre-activations a trainable layer keeps (one float otherwise).
    pub pre_activations: usize,
    /// Each slot's gate with `gate_on: input` (one float otherwise).
    pub slot_gates: usize,
    pub readback: usize,
}

impl ScratchSizes {
    pub fn for_plan(plan: &ForwardPlan) -> Self {
        let LayerShape {
            num_experts,
            d_model,
            d_ff,
        } = plan.shape;
        let t = plan.num_tokens;
        ScratchSizes {
            // Whole vec4s, at least one: stage_tokens binds x, expert_down hidden, as vec4
            // arrays.
            x: padded_to_vec4(t * d_model).max(4),
            logits: t * plan.router_rows(),
            assignments: plan.num_assignments(),
            tokens: t,
            block_router_sums: plan.num_route_blocks * (num_experts + 1),
            block_counts: plan.num_assign_blocks * plan.top_k * num_experts,
            group_kept_prefix: plan.num_groups * num_experts,
            expert_table: plan.expert_table_len(),
            slots: plan.max_slots(),
            hidden: (plan.max_slots() * padded_to_vec4(d_ff)).max(4),
            expert_out: plan.max_slots() * d_model,
            pre_activations: (plan.max_slots() * plan.pre_activation_stride).max(1),
            slot_gates: if plan.gate_input { plan.max_slots() } else { 1 },
            readback: readback_len(plan),
        }
    }

    /// The element-wise maximum.
    pub fn max(self, other: Self) -> Self {
        ScratchSizes {
            x: self.x.max(other.x),
            logits: self.logits.max(other.logits),
            assignments: self.assignments.max(other.assignments),
            tokens: self.tokens.max(other.tokens),
            block_router_sums: self.block_router_sums.max(other.block_router_sums),
            block_counts: self.block_counts.max(other.block_counts),
            group_kept_prefix: self.group_kept_prefix.max(other.group_kept_prefix),
            expert_table: self.expert_table.max(other.expert_table),
            slots: self.slots.max(other.slots),
            hidden: self.hidden.max(other.hidden),
            expert_out: self.expert_out.max(other.expert_out),
            pre_activations: self.pre_activations.max(other.pre_activations),
            slot_gates: self.slot_gates.max(other.slot_gates),
            readback: self.readback.max(other.readback),
        }
    }

    /// The largest storage buffer, in bytes (the readback buffer is not a binding).
    pub fn largest_binding_bytes(&self) -> u64 {
        let largest = [
            self.x,
            self.logits,
            self.assignments,
            self.block_router_sums,
            self.block_counts,
            self.expert_table,
            self.hidden,
            self.expert_out,
            self.pre_activations,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        largest as u64 * 4
    }

    /// Total bytes of the scratch buffers (for memory reports).
    pub fn total_bytes(&self) -> u64 {
        let elements = 3 * self.x // x, its rows texture (about as large), y
            + self.logits
            + 3 * self.assignments // routes, gates, assignment_slot
            + self.tokens
            + self.block_router_sums
            + 2 * self.block_counts
            + self.group_kept_prefix
            + self.expert_table
            + self.slots
            + self.hidden
            + self.expert_out
            + self.pre_activations
            + self.slot_gates
            + self.readback;
        elements as u64 * 4
    }
}

/// Elements read back after a forward: y, routes, gates, route_prob_max, the expert table's
/// head (counts, kept, tile_start, n_dropped), router_stats, flags, two u64 timestamps.
pub fn readback_len(plan: &ForwardPlan) -> usize {
    let n = plan.shape.num_experts;
    plan.num_tokens * plan.shape.d_model
        + 2 * plan.num_assignments()
        + plan.num_tokens
        + (3 * n + 2)
        + (n + 2)
        + 1
        + 4
}

/// Where `MoeLayer::encode_forward` writes each statistic in the caller's buffer, in
/// 4-byte words (u32 or f32 bit patterns): routes [T·k], gates [T·k], route_prob_max [T],
/// counts [N], kept [N], n_dropped, route_prob_sum [N], aux_loss, z_loss,
/// first_non_finite_token (`u32::MAX` when every token is finite).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatisticsLayout {
    pub routes: usize,
    pub gates: usize,
    pub route_prob_max: usize,
    pub counts: usize,
    pub kept: usize,
    pub n_dropped: usize,
    pub route_prob_sum: usize,
    pub aux_loss: usize,
    pub z_loss: usize,
    pub first_non_finite_token: usize,
    /// Words in all.
    pub words: usize,
}

impl StatisticsLayout {
    pub fn new(num_tokens: usize, top_k: usize, num_experts: usize) -> Self {
        let assignments = num_tokens * top_k;
        let routes = 0;
        let gates = routes + assignments;
        let route_prob_max = gates + assignments;
        let counts = route_prob_max + num_tokens;
        let kept = counts + num_experts;
        let n_dropped = kept + num_experts;
        let route_prob_sum = n_dropped + 1;
        let aux_loss = route_prob_sum + num_experts;
        let z_loss = aux_loss + 1;
        let first_non_finite_token = z_loss + 1;
        StatisticsLayout {
            routes,
            gates,
            route_prob_max,
            counts,
            kept,
            n_dropped,
            route_prob_sum,
            aux_loss,
            z_loss,
            first_non_finite_token,
            words: first_non_finite_token + 1,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.words as u64 * 4
    }
}
