//! transformers' gpt-oss experts (`GptOssExperts`), which name and lay out their own:
//! `router.weight [N, D]` and `router.bias [N]` (the native names), `experts.gate_up_proj
//! [N, D, 2F]` — `[in, out]`, the gate and up columns interleaved (gate at even columns,
//! up at odd) — with `experts.gate_up_proj_bias [N, 2F]`, and `experts.down_proj [N, F, D]`
//! with `experts.down_proj_bias [N, D]`. Read into the native layout (w1 the gate, w3 up,
//! `[out, in]`), as f32: the transposes leave no stored rows to keep.

use super::tensor_source::{rank2, rank3, TensorSource};
use super::{LayerShape, MoeWeights};
use crate::error::{MoeError, Result};
use crate::formats::ExpertMatrices;

/// gpt-oss's names: `router.weight` with `experts.gate_up_proj` marks its layout.
pub(super) const GPT_OSS_KEYS: [&str; 6] = [
    "router.weight",
    "router.bias",
    "experts.gate_up_proj",
    "experts.gate_up_proj_bias",
    "experts.down_proj",
    "experts.down_proj_bias",
];

/// Each expert's `[rows, cols]` transposed: `[N, rows, cols]` → `[N, cols, rows]`.
fn transpose_experts(values: &[f32], [n, rows, cols]: [usize; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * rows * cols);
    for expert in values.chunks_exact(rows * cols).take(n) {
        for c in 0..cols {
            out.extend((0..rows).map(|r| expert[r * cols + c]));
        }
    }
    out
}

/// Every other value of each expert's row, from `first`: the gate's or up's columns.
fn deinterleave(values: &[f32], first: usize) -> Vec<f32> {
    values.iter().skip(first).step_by(2).copied().collect()
}

impl MoeWeights {
    pub(super) fn read_gpt_oss(source: &mut TensorSource<'_>) -> Result<Self> {
        let router_shape = source.shape_of("router.weight")?;
        let (n, d) = rank2(&source.full_name("router.weight"), &router_shape, "[N, D]")?;
        let name = source.full_name("experts.gate_up_proj");
        let gate_up_shape = source.shape_of("experts.gate_up_proj")?;
        let (_, _, two_f) = rank3(&name, &gate_up_shape, "[N, D, 2F]")?;
        if two_f % 2 != 0 {
            return Err(MoeError::tensor(
                &name,
                format!("shape {gate_up_shape:?}: the last dimension 2F must be even"),
            ));
        }
        let f = two_f / 2;
        source.dims_from = format!(
            "N, D from `{}` {router_shape:?}, 2F from `{name}` {gate_up_shape:?}",
            source.full_name("router.weight")
        );
        // Transposed to [N, 2F, D], rows 2f are the gate's and 2f + 1 up's.
        let gate_up = source.required("experts.gate_up_proj", &[n, d, two_f], "[N, D, 2F]")?;
        let (gate, up) = split_interleaved_rows(&transpose_experts(&gate_up, [n, d, two_f]), d);
        let gate_up_bias = source.optional("experts.gate_up_proj_bias", &[n, two_f], "[N, 2F]")?;
        let down = source.required("experts.down_proj", &[n, f, d], "[N, F, D]")?;
        Ok(MoeWeights {
            shape: LayerShape {
                num_experts: n,
                d_model: d,
                d_ff: f,
            },
            router_weight: source.required("router.weight", &[n, d], "[N, D]")?,
            router_bias: source.optional("router.bias", &[n], "[N]")?,
            score_bias: None,
            w1: ExpertMatrices::from_f32(n, f, d, gate),
            b1: gate_up_bias.as_deref().map(|b| deinterleave(b, 0)),
            w2: ExpertMatrices::from_f32(n, d, f, transpose_experts(&down, [n, f, d])),
            b2: source.optional("experts.down_proj_bias", &[n, d], "[N, D]")?,
            w3: Some(ExpertMatrices::from_f32(n, f, d, up)),
            b3: gate_up_bias.as_deref().map(|b| deinterleave(b, 1)),
            shared: None,
        })
    }
}

/// Rows of `d` values, the gate's and up's interleaved (`[N, 2F, D]`), split into the
/// gate's even rows and up's odd ones (each `[N, F, D]`).
fn split_interleaved_rows(values: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let half = values.len() / 2;
    let (mut gate, mut up) = (Vec::with_capacity(half), Vec::with_capacity(half));
    for (i, row) in values.chunks_exact(d).enumerate() {
        if i % 2 == 0 { &mut gate } else { &mut up }.extend_from_slice(row);
    }
    (gate, up)
}
