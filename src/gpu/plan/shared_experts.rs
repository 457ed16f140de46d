//! A shared expert as extra experts of the grouped dispatch. An FFN of width `m·F` is
//! exactly the sum of `m` FFNs of width `F` over slices of its rows (its W2's columns; `b2`
//! added once), so a shared expert of width `Fs` becomes `m = ⌈Fs / F⌉` experts appended
//! after the `N` routed ones (the last one's rows zero-padded: a zero row of W1 and W3 and
//! a zero column of W2 add exactly nothing), and every token chooses all `m` of them after
//! its `k` routed choices, weighed by `σ(x·gate)` (or 1), never dropped. Their gate's
//! weights ride the router as its row `N`: route_tokens computes the logit with the
//! others and excludes it from the scores. Training runs on this layout too (its padding
//! rows get zero gradients and stay zero; the slices after the first get no b2 gradient;
//! the gate's place in a router bias stays 0), and [`routed_and_shared`] turns what is
//! read back (gradients, trained weights: `ParameterLayout`) into the layer's own tensors. Pure data: the
//! layer uploads the result.

use crate::error::{MoeError, Result};
use crate::formats::ExpertMatrices;
use crate::weights::{LayerShape, MoeWeights, SharedExpert};

/// How a layer's shared expert rides the grouped dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedExperts {
    /// Experts it becomes, after the routed ones.
    pub experts: usize,
    /// Its own width `Fs`.
    pub d_ff: usize,
    /// Whether the router holds its gate as row N.
    pub gate: bool,
}

/// `m` F-wide experts of `rows(i)` (the i-th slice's rows, zero-padded), stacked after
/// `routed`'s experts.
fn appended(
    routed: &ExpertMatrices,
    extra: Vec<f32>,
    m: usize,
    name: &str,
) -> Result<ExpertMatrices> {
    let mut values = routed
        .f32_values()
        .ok_or_else(|| {
            MoeError::tensor(
                name,
                format!(
                    "{} on the GPU with a shared expert: the routed experts must be f32 \
                     (the shared expert rides their dispatch)",
                    routed.format.name()
                ),
            )
        })?
        .to_vec();
    values.extend(extra);
    Ok(ExpertMatrices::from_f32(
        routed.count + m,
        routed.rows,
        routed.cols,
        values,
    ))
}

/// `[m, F, D]` of a `[Fs, D]` matrix (W1, W3): its rows in slices of F, zero-padded.
fn row_slices(matrix: &[f32], (fs, d): (usize, usize), (m, f): (usize, usize)) -> Vec<f32> {
    let mut out = vec![0.0f32; m * f * d];
    out[..fs * d].copy_from_slice(&matrix[..fs * d]);
    out
}

/// `[m, D, F]` of a `[D, Fs]` matrix (W2): its columns in slices of F, zero-padded.
fn column_slices(matrix: &[f32], (d, fs): (usize, usize), (m, f): (usize, usize)) -> Vec<f32> {
    let mut out = vec![0.0f32; m * d * f];
    for i in 0..m {
        for row in 0..d {
            for col in 0..f {
                let source = i * f + col;
                if source < fs {
                    out[(i * d + row) * f + col] = matrix[row * fs + source];
                }
            }
        }
    }
    out
}

/// A bias of the routed experts with the shared expert's slices appended (`shared_len`
/// values), zeros for the part that has none, or None when neither has one.
fn appended_bias(
    routed: &Option<Vec<f32>>,
    shared: Option<Vec<f32>>,
    (n, per_expert): (usize, usize),
    shared_len: usize,
) -> Option<Vec<f32>> {
    if routed.is_none() && shared.is_none() {
        return None;
    }
    let mut values = routed.clone().unwrap_or_else(|| vec![0.0; n * per_expert]);
    values.extend(shared.unwrap_or_else(|| vec![0.0; shared_len]));
    Some(values)
}

/// The layer's weights as the GPU runs them when it has a shared expert (None without
/// one: the weights as they are): the routed experts then the shared expert's `m` slices,
/// the router with the shared gate as row N (when it has one); and how many. The result's
/// router has N (+ 1) rows for N + m experts: the GPU's own layout, not a layer
/// `MoeWeights::check` accepts.
pub fn with_shared_as_experts(weights: &MoeWeights) -> Result<Option<(MoeWeights, SharedExperts)>> {
    let Some(shared) = &weights.shared else {
        return Ok(None);
    };
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = weights.shape;
    let SharedExpert { d_ff: fs, .. } = *shared;
    let m = fs.div_ceil(f);
    let padded = |bias: &Option<Vec<f32>>, len: usize, total: usize| {
        bias.as_ref().map(|b| {
            let mut out = vec![0.0f32; total];
            out[..len].copy_from_slice(b);
            out
        })
    };
    // b2 once: on the first slice.
    let shared_b2 = shared.b2.as_ref().map(|b2| {
        let mut out = vec![0.0f32; m * d];
        out[..d].copy_from_slice(b2);
        out
    });
    let w3 = match (&weights.w3, &shared.w3) {
        (Some(w3), Some(shared_w3)) => Some(appended(
            w3,
            row_slices(shared_w3, (fs, d), (m, f)),
            m,
            "experts.w3",
        )?),
        _ => None,
    };
    let mut router_weight = weights.router_weight.clone();
    let mut router_bias = weights.router_bias.clone();
    if let Some(gate) = &shared.gate {
        router_weight.extend(gate);
        if let Some(bias) = router_bias.as_mut() {
            bias.push(0.0);
        }
    }
    let expanded = MoeWeights {
        shape: LayerShape {
            num_experts: n + m,
            d_model: d,
            d_ff: f,
        },
        router_weight,
        router_bias,
        score_bias: weights.score_bias.clone(),
        w1: appended(
            &weights.w1,
            row_slices(&shared.w1, (fs, d), (m, f)),
            m,
            "experts.w1",
        )?,
        b1: appended_bias(&weights.b1, padded(&shared.b1, fs, m * f), (n, f), m * f),
        w2: appended(
            &weights.w2,
            column_slices(&shared.w2, (d, fs), (m, f)),
            m,
            "experts.w2",
        )?,
        b2: appended_bias(&weights.b2, shared_b2, (n, d), m * d),
        w3,
        b3: appended_bias(&weights.b3, padded(&shared.b3, fs, m * f), (n, f), m * f),
        shared: None,
    };
    Ok(Some((
        expanded,
        SharedExperts {
            experts: m,
            d_ff: fs,
            gate: shared.gate.is_some(),
        },
    )))
}

/// A layer's f32 tensors but its shared expert's (weights or their gradients): as
/// [`with_shared_as_experts`] lays them out, or the routed part alone.
pub struct LayerTensors {
    pub router_weight: Vec<f32>,
    pub router_bias: Option<Vec<f32>>,
    pub w1: Vec<f32>,
    pub b1: Option<Vec<f32>>,
    pub w2: Vec<f32>,
    pub b2: Option<Vec<f32>>,
    pub w3: Option<Vec<f32>>,
    pub b3: Option<Vec<f32>>,
}

/// `[Fs, D]` of `m` row slices `[m, F, D]` (W1, W3): the padding rows left out.
fn joined_rows(slices: &[f32], fs: usize, d: usize) -> Vec<f32> {
    slices[..fs * d].to_vec()
}

/// `[D, Fs]` of `m` column slices `[m, D, F]` (W2).
fn joined_columns(slices: &[f32], (d, fs): (usize, usize), f: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; d * fs];
    for row in 0..d {
        for col in 0..fs {
            let (i, within) = (col / f, col % f);
            out[row * fs + col] = slices[(i * d + row) * f + within];
        }
    }
    out
}

/// Expanded tensors split back into the routed experts' (N rows of the router, N experts)
/// and the shared expert's: its slices joined, b2 from the first slice, its gate the
/// router's row N. Inverse of [`with_shared_as_experts`] for the tensors both parts have.
pub fn routed_and_shared(
    expanded: LayerTensors,
    routed: LayerShape,
    shared: SharedExperts,
) -> (LayerTensors, SharedExpert) {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = routed;
    let fs = shared.d_ff;
    let split = |values: Vec<f32>, per_expert: usize| {
        let tail = values[n * per_expert..].to_vec();
        let mut head = values;
        head.truncate(n * per_expert);
        (head, tail)
    };
    let split_bias = |values: Option<Vec<f32>>, per_expert: usize| match values {
        Some(values) => {
            let (head, tail) = split(values, per_expert);
            (Some(head), Some(tail))
        }
        None => (None, None),
    };
    let (router_weight, gate) = split(expanded.router_weight, d);
    let router_bias = expanded.router_bias.map(|mut bias| {
        bias.truncate(n);
        bias
    });
    let (w1, shared_w1) = split(expanded.w1, f * d);
    let (w2, shared_w2) = split(expanded.w2, d * f);
    let (w3, shared_w3) = split_bias(expanded.w3, f * d);
    let (b1, shared_b1) = split_bias(expanded.b1, f);
    let (b2, shared_b2) = split_bias(expanded.b2, d);
    let (b3, shared_b3) = split_bias(expanded.b3, f);
    let unpadded = |bias: Vec<f32>, len: usize| bias[..len].to_vec();
    let shared_expert = SharedExpert {
        d_ff: fs,
        w1: joined_rows(&shared_w1, fs, d),
        b1: shared_b1.map(|b| unpadded(b, fs)),
        w2: joined_columns(&shared_w2, (d, fs), f),
        b2: shared_b2.map(|b| unpadded(b, d)),
        w3: shared_w3.map(|w| joined_rows(&w, fs, d)),
        b3: shared_b3.map(|b| unpadded(b, fs)),
        gate: shared.gate.then_some(gate),
    };
    let routed_tensors = LayerTensors {
        router_weight,
        router_bias,
        w1,
        b1,
        w2,
        b2,
        w3,
        b3,
    };
    (routed_tensors, shared_expert)
}

/// Training on this layout trains exactly the layer's own parameters when every bias is
/// held by both the routed experts and the shared expert or by neither (a bias only one
/// part has would be trained, as zeros, in the other). Errors name the bias.
pub fn check_trainable(weights: &MoeWeights) -> Result<()> {
    let Some(shared) = &weights.shared else {
        return Ok(());
    };
    for (name, routed, of_shared) in [
        ("b1", weights.b1.is_some(), shared.b1.is_some()),
        ("b2", weights.b2.is_some(), shared.b2.is_some()),
        ("b3", weights.b3.is_some(), shared.b3.is_some()),
    ] {
        if routed != of_shared {
            let tensor = if routed {
                format!("shared.{name}")
            } else {
                format!("experts.{name}")
            };
            return Err(MoeError::tensor(
                &tensor,
                format!(
                    "missing: training on the GPU with a shared expert needs {name} on both \
                     the routed experts and the shared expert, or on neither"
                ),
            ));
        }
    }
    Ok(())
}
