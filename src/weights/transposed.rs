//! transformers' experts stored `[in, out]`, under the router name `router.weight` (the
//! native one): gpt-oss's and Llama 4's.
//!
//! gpt-oss's (`GptOssExperts`) name and lay out their own:
//! `router.weight [N, D]` and `router.bias [N]` (the native names), `experts.gate_up_proj
//! [N, D, 2F]` — `[in, out]`, the gate and up columns interleaved (gate at even columns,
//! up at odd) — with `experts.gate_up_proj_bias [N, 2F]`, and `experts.down_proj [N, F, D]`
//! with `experts.down_proj_bias [N, D]`. Read into the native layout (w1 the gate, w3 up,
//! `[out, in]`), as f32: the transposes leave no stored rows to keep.
//!
//! The published checkpoints store the experts in MXFP4 instead, `[out, in]` already:
//! `experts.gate_up_proj_blocks [N, 2F, D/32, 16]` (u8, two E2M1 values a byte, the low
//! nibble first) with `experts.gate_up_proj_scales [N, 2F, D/32]` (u8, E8M0), the gate and
//! up rows interleaved, and `experts.down_proj_blocks [N, D, F/32, 16]` with its scales.
//! Those are kept in MXFP4: each 32 values are repacked into ggml's block (the scale byte,
//! then value j in the low nibble of byte j and value j + 16 in its high nibble).
//!
//! Llama 4's (`Llama4TextExperts`): `experts.gate_up_proj [N, D, 2F]` with the gate's F
//! columns first, then up's, `experts.down_proj [N, F, D]`, no biases, and the shared
//! expert `shared_expert.{gate,up,down}_proj.weight`. Told from gpt-oss's by the biases,
//! which gpt-oss's experts always carry and Llama 4's never.

use super::tensor_source::{rank2, TensorSource};
use super::{LayerShape, MoeWeights};
use crate::error::{MoeError, Result};
use crate::formats::{ExpertMatrices, WeightFormat};

/// gpt-oss's names: `router.weight` with `experts.gate_up_proj` (or its MXFP4 blocks)
/// marks the layout; Llama 4's are among them.
pub(super) const TRANSPOSED_KEYS: [&str; 10] = [
    "router.weight",
    "router.bias",
    "experts.gate_up_proj",
    "experts.gate_up_proj_blocks",
    "experts.gate_up_proj_scales",
    "experts.gate_up_proj_bias",
    "experts.down_proj",
    "experts.down_proj_blocks",
    "experts.down_proj_scales",
    "experts.down_proj_bias",
];

/// Whose transposed experts the layer's tensors (prefix stripped) are, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Transposed {
    GptOss,
    Llama4,
}

impl Transposed {
    pub(super) fn of(has: impl Fn(&str) -> bool) -> Option<Self> {
        if !has("router.weight") {
            return None;
        }
        if has("experts.gate_up_proj_blocks") || has("experts.gate_up_proj_bias") {
            Some(Transposed::GptOss)
        } else if has("experts.gate_up_proj") {
            Some(Transposed::Llama4)
        } else {
            None
        }
    }
}

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

/// Rows of `row_len` items, the gate's and up's interleaved, split into the gate's even
/// rows and up's odd ones; a bias `[N, 2F]` is rows of one.
fn deinterleave_rows<T: Copy>(values: &[T], row_len: usize) -> (Vec<T>, Vec<T>) {
    let half = values.len() / 2;
    let (mut gate, mut up) = (Vec::with_capacity(half), Vec::with_capacity(half));
    for (i, row) in values.chunks_exact(row_len).enumerate() {
        if i % 2 == 0 { &mut gate } else { &mut up }.extend_from_slice(row);
    }
    (gate, up)
}

/// MXFP4 matrices `[n, rows, cols]` from the checkpoint's `{key}_blocks` and `{key}_scales`,
/// repacked into ggml's blocks.
fn mxfp4_experts(
    source: &mut TensorSource<'_>,
    key: &str,
    [n, rows, cols]: [usize; 3],
) -> Result<Vec<u8>> {
    let (blocks_key, scales_key) = (format!("{key}_blocks"), format!("{key}_scales"));
    let groups = cols / 32;
    let missing =
        |source: &TensorSource<'_>, key: &str| MoeError::tensor(&source.full_name(key), "missing");
    let blocks = source
        .packed_bytes(
            &blocks_key,
            &[n, rows, groups, 16],
            "[N, rows, cols / 32, 16]",
        )?
        .ok_or_else(|| missing(source, &blocks_key))?;
    let scales = source
        .packed_bytes(&scales_key, &[n, rows, groups], "[N, rows, cols / 32]")?
        .ok_or_else(|| missing(source, &scales_key))?;
    let mut out = Vec::with_capacity(scales.len() * WeightFormat::Mxfp4.block_bytes());
    for (&scale, packed) in scales.iter().zip(blocks.chunks_exact(16)) {
        let nibble = |v: usize| (packed[v / 2] >> (4 * (v % 2))) & 0xF;
        out.push(scale);
        out.extend((0..16).map(|j| nibble(j) | nibble(j + 16) << 4));
    }
    Ok(out)
}

/// N and D from the router, F from the gate-up projection `gate_up_key` (2F at `axis`
/// of its shape, which must be `rank` long), recorded for shape errors.
fn transposed_sizes(
    source: &mut TensorSource<'_>,
    gate_up_key: &str,
    (rank, axis, expected): (usize, usize, &str),
) -> Result<(usize, usize, usize)> {
    let router_shape = source.shape_of("router.weight")?;
    let (n, d) = rank2(&source.full_name("router.weight"), &router_shape, "[N, D]")?;
    let name = source.full_name(gate_up_key);
    let gate_up_shape = source.shape_of(gate_up_key)?;
    if gate_up_shape.len() != rank || gate_up_shape[axis] % 2 != 0 {
        return Err(MoeError::tensor(
            &name,
            format!("shape {gate_up_shape:?}, expected {expected} (2F even)"),
        ));
    }
    source.dims_from = format!(
        "N, D from `{}` {router_shape:?}, 2F from `{name}` {gate_up_shape:?}",
        source.full_name("router.weight")
    );
    Ok((n, d, gate_up_shape[axis] / 2))
}

/// w1, w2 and w3 from f32/f16/bf16 `experts.gate_up_proj [N, D, 2F]` and
/// `experts.down_proj [N, F, D]`, transposed to `[out, in]`; the gate's and up's rows of
/// each `[2F, D]` expert interleaved (gpt-oss) or in halves (Llama 4).
fn transposed_experts(
    source: &mut TensorSource<'_>,
    (n, d, f): (usize, usize, usize),
    interleaved: bool,
) -> Result<(ExpertMatrices, ExpertMatrices, ExpertMatrices)> {
    let name = source.full_name("experts.gate_up_proj");
    let gate_up = source.required("experts.gate_up_proj", &[n, d, 2 * f], "[N, D, 2F]")?;
    let gate_up = transpose_experts(&gate_up, [n, d, 2 * f]);
    let (w1, w3) = if interleaved {
        let (gate, up) = deinterleave_rows(&gate_up, d);
        (
            ExpertMatrices::from_f32(n, f, d, gate),
            ExpertMatrices::from_f32(n, f, d, up),
        )
    } else {
        ExpertMatrices::from_f32(n, 2 * f, d, gate_up).split_rows(f, &name)?
    };
    let down = source.required("experts.down_proj", &[n, f, d], "[N, F, D]")?;
    let w2 = ExpertMatrices::from_f32(n, d, f, transpose_experts(&down, [n, f, d]));
    Ok((w1, w2, w3))
}

/// w1, w2 and w3 from gpt-oss's MXFP4 blocks, kept in MXFP4.
fn mxfp4_gate_up_down(
    source: &mut TensorSource<'_>,
    (n, d, f): (usize, usize, usize),
) -> Result<(ExpertMatrices, ExpertMatrices, ExpertMatrices)> {
    let gate_up_name = source.full_name("experts.gate_up_proj_blocks");
    let row_bytes = WeightFormat::Mxfp4.row_bytes(d, &gate_up_name)?;
    let gate_up = mxfp4_experts(source, "experts.gate_up_proj", [n, 2 * f, d])?;
    let (gate, up) = deinterleave_rows(&gate_up, row_bytes);
    let down = mxfp4_experts(source, "experts.down_proj", [n, d, f])?;
    let down_name = source.full_name("experts.down_proj_blocks");
    let stored = |dims: [usize; 3], bytes: Vec<u8>, name: &str| {
        ExpertMatrices::from_stored(WeightFormat::Mxfp4, dims, bytes, name)
    };
    Ok((
        stored([n, f, d], gate, &gate_up_name)?,
        stored([n, d, f], down, &down_name)?,
        stored([n, f, d], up, &gate_up_name)?,
    ))
}

impl MoeWeights {
    /// Llama 4's experts and shared expert.
    pub(super) fn read_llama4(source: &mut TensorSource<'_>) -> Result<Self> {
        let sizes = transposed_sizes(source, "experts.gate_up_proj", (3, 2, "[N, D, 2F]"))?;
        let (n, d, f) = sizes;
        let (w1, w2, w3) = transposed_experts(source, sizes, false)?;
        Ok(MoeWeights {
            shape: LayerShape {
                num_experts: n,
                d_model: d,
                d_ff: f,
            },
            router_weight: source.required("router.weight", &[n, d], "[N, D]")?,
            router_bias: None,
            score_bias: None,
            w1,
            b1: None,
            w2,
            b2: None,
            w3: Some(w3),
            b3: None,
            shared: Self::read_hf_shared(source, d)?,
        })
    }

    /// gpt-oss's experts, f32/f16/bf16 or MXFP4, with their biases.
    pub(super) fn read_gpt_oss(source: &mut TensorSource<'_>) -> Result<Self> {
        let mxfp4 = source.shape_of("experts.gate_up_proj_blocks").is_ok();
        let (sizes, (w1, w2, w3)) = if mxfp4 {
            let sizes = transposed_sizes(
                source,
                "experts.gate_up_proj_blocks",
                (4, 1, "[N, 2F, D / 32, 16]"),
            )?;
            (sizes, mxfp4_gate_up_down(source, sizes)?)
        } else {
            let sizes = transposed_sizes(source, "experts.gate_up_proj", (3, 2, "[N, D, 2F]"))?;
            (sizes, transposed_experts(source, sizes, true)?)
        };
        let (n, d, f) = sizes;
        let gate_up_bias = source.optional("experts.gate_up_proj_bias", &[n, 2 * f], "[N, 2F]")?;
        let (b1, b3) = match gate_up_bias {
            Some(bias) => {
                let (gate, up) = deinterleave_rows(&bias, 1);
                (Some(gate), Some(up))
            }
            None => (None, None),
        };
        Ok(MoeWeights {
            shape: LayerShape {
                num_experts: n,
                d_model: d,
                d_ff: f,
            },
            router_weight: source.required("router.weight", &[n, d], "[N, D]")?,
            router_bias: source.optional("router.bias", &[n], "[N]")?,
            score_bias: None,
            w1,
            b1,
            w2,
            b2: source.optional("experts.down_proj_bias", &[n, d], "[N, D]")?,
            w3: Some(w3),
            b3,
            shared: None,
        })
    }
}
