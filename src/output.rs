//! `MoeOutput`: what one forward returns (SPEC's statistics table), the same for the CPU
//! reference and the GPU layer, and the input-shape rules both share.

use std::collections::BTreeMap;

use crate::error::{MoeError, Result};
use crate::tensor_io::{serialize_tensors, OwnedTensor};

/// The layer output and its routing statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeOutput {
    /// Shape of `x` and `y`: `[T, D]` or `[S, B, D]`.
    pub shape: Vec<usize>,
    pub num_experts: usize,
    pub top_k: usize,
    /// The layer output, shaped like `x`.
    pub y: Vec<f32>,
    /// `[T, k]`: chosen experts, best first.
    pub routes: Vec<u32>,
    /// `[T, k]`: gate weights as used in the combine.
    pub gates: Vec<f32>,
    /// `[T]`: top-1 probability.
    pub route_prob_max: Vec<f32>,
    /// `[N]`: assignments routed to each expert before dropping.
    pub counts: Vec<u32>,
    /// `[N]`: assignments each expert processed.
    pub kept: Vec<u32>,
    /// `[N]`: sum over tokens of the full softmax.
    pub route_prob_sum: Vec<f32>,
    /// Dropped assignments.
    pub n_dropped: u32,
    /// Switch load-balancing loss `N·Σ_e (counts[e]/T)·(route_prob_sum[e]/T)`.
    pub aux_loss: f32,
    /// Router z-loss `mean_t (logsumexp_e h[t,e])²`.
    pub z_loss: f32,
}

impl MoeOutput {
    pub fn num_tokens(&self) -> usize {
        self.route_prob_max.len()
    }

    /// Every statistic as safetensors bytes, named as in the README's table
    /// (integers as i64, scalars as 0-d tensors).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let t = self.num_tokens();
        let (n, k) = (self.num_experts, self.top_k);
        let ints = |v: &[u32]| v.iter().map(|&c| c as i64).collect::<Vec<_>>();
        let mut tensors = BTreeMap::new();
        tensors.insert("y".into(), OwnedTensor::f32(self.shape.clone(), &self.y));
        tensors.insert(
            "routes".into(),
            OwnedTensor::i64(vec![t, k], ints(&self.routes)),
        );
        tensors.insert("gates".into(), OwnedTensor::f32(vec![t, k], &self.gates));
        tensors.insert(
            "route_prob_max".into(),
            OwnedTensor::f32(vec![t], &self.route_prob_max),
        );
        tensors.insert(
            "counts".into(),
            OwnedTensor::i64(vec![n], ints(&self.counts)),
        );
        tensors.insert("kept".into(), OwnedTensor::i64(vec![n], ints(&self.kept)));
        tensors.insert(
            "route_prob_sum".into(),
            OwnedTensor::f32(vec![n], &self.route_prob_sum),
        );
        tensors.insert(
            "n_dropped".into(),
            OwnedTensor::i64(vec![], [self.n_dropped as i64]),
        );
        tensors.insert(
            "aux_loss".into(),
            OwnedTensor::f32(vec![], &[self.aux_loss]),
        );
        tensors.insert("z_loss".into(), OwnedTensor::f32(vec![], &[self.z_loss]));
        serialize_tensors(&tensors)
    }
}

/// The number of tokens of an input `x` of `shape` holding `len` values: `[T, D]` or
/// `[S, B, D]` (flattened row-major to `T = S·B`), with `D = d_model` and `T ≥ 1`.
pub fn num_tokens_of(shape: &[usize], len: usize, d_model: usize) -> Result<usize> {
    let (tokens, d) = match shape {
        [t, d] => (*t, *d),
        [s, b, d] => (s.saturating_mul(*b), *d),
        _ => {
            return Err(MoeError::InputShape {
                message: format!("shape {shape:?}: expected [T, D] or [S, B, D]"),
            })
        }
    };
    if d != d_model {
        return Err(MoeError::InputShape {
            message: format!("shape {shape:?}: last dimension must be d_model = {d_model}"),
        });
    }
    if tokens == 0 {
        return Err(MoeError::InputShape {
            message: format!("shape {shape:?} holds no tokens"),
        });
    }
    if tokens.checked_mul(d) != Some(len) {
        return Err(MoeError::InputShape {
            message: format!("shape {shape:?} does not match the {len} values given"),
        });
    }
    Ok(tokens)
}

/// Checks a caller's routes (`forward_experts`) for `num_tokens` tokens and `n` experts:
/// `top_k_index` and `top_k_weights` both `[T, k]`, 1 ≤ k ≤ n, expert ids below n, finite
/// weights. Returns k.
pub fn check_routes(
    n: usize,
    num_tokens: usize,
    top_k_index: &[u32],
    top_k_weights: &[f32],
) -> Result<usize> {
    if top_k_index.len() != top_k_weights.len() {
        return Err(MoeError::tensor(
            "top_k_weights",
            format!(
                "{} values, but top_k_index holds {}",
                top_k_weights.len(),
                top_k_index.len()
            ),
        ));
    }
    let top_k = top_k_index.len() / num_tokens.max(1);
    if num_tokens == 0 || top_k == 0 || top_k * num_tokens != top_k_index.len() || top_k > n {
        return Err(MoeError::tensor(
            "top_k_index",
            format!(
                "{} values for {num_tokens} tokens: expected [T, k] with 1 ≤ k ≤ {n}",
                top_k_index.len()
            ),
        ));
    }
    if let Some(at) = top_k_index.iter().position(|&e| e as usize >= n) {
        return Err(MoeError::tensor(
            "top_k_index",
            format!(
                "expert {} at flat index {at}; the layer has {n} experts",
                top_k_index[at]
            ),
        ));
    }
    if let Some(at) = top_k_weights.iter().position(|w| !w.is_finite()) {
        return Err(MoeError::tensor(
            "top_k_weights",
            format!("non-finite value at flat index {at}"),
        ));
    }
    Ok(top_k)
}
