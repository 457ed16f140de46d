//! Loading `MoeWeights` from a llama.cpp GGUF file: one MoE layer's tensors under a prefix
//! (`blk.3.`), mapped to the native names, the expert matrices kept in their stored format.
//!
//! llama.cpp's names: `ffn_gate_inp.weight` is the router `[N, D]`; gated experts are
//! `ffn_gate_exps.weight` (w1, the activated gate), `ffn_up_exps.weight` (w3) and
//! `ffn_down_exps.weight` (w2); without `ffn_gate_exps`, `ffn_up_exps` is w1. Biases
//! `ffn_gate_inp.bias` and `ffn_{gate,up,down}_exps.bias` follow their weights. GGUF lists
//! dimensions innermost first, so w1 `[N, F, D]` has dims `[D, F, N]`: its rows are the
//! file's rows, byte for byte.
//!
//! A shared expert is `ffn_{gate,up,down}_shexp.weight` (w1, w3, w2 as above, one matrix
//! each) with Qwen2-MoE's sigmoid gate `ffn_gate_inp_shexp.weight`; DeepSeek's selection
//! bias is `exp_probs_b.bias`. The metadata the layer's semantics come from is kept in
//! [`GgufLayerInfo`] (see `gguf_config` for how a family's config follows from it).

use super::{check_finite, LayerShape, MoeWeights, SharedExpert};
use crate::error::{MoeError, Result};
use crate::formats::{ExpertMatrices, WeightFormat};
use crate::gguf::{ggml_type_name, GgufFile, GgufTensor};

/// The router's name under a layer's prefix: what marks an MoE layer.
const ROUTER: &str = "ffn_gate_inp.weight";

/// What a GGUF file says about the layer beyond its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufLayerInfo {
    /// The layer's prefix (`blk.3.`), given or found.
    pub prefix: String,
    /// `general.architecture`, if the file names one.
    pub architecture: Option<String>,
    /// `{arch}.expert_count`.
    pub expert_count: Option<usize>,
    /// `{arch}.expert_used_count`: the model's top-k.
    pub expert_used_count: Option<usize>,
    /// `{arch}.expert_group_count`: DeepSeek's expert groups.
    pub expert_group_count: Option<usize>,
    /// `{arch}.expert_group_used_count`: the groups a token chooses from.
    pub expert_group_used_count: Option<usize>,
    /// `{arch}.expert_gating_func`, llama.cpp's numbering: 1 softmax, 2 sigmoid, 3 softmax
    /// over the chosen logits (0 or absent: the architecture's own).
    pub expert_gating_func: Option<u64>,
    /// `{arch}.expert_weights_scale`: the routed weights' scale (DeepSeek's
    /// `routed_scaling_factor`).
    pub expert_weights_scale: Option<f64>,
    /// `{arch}.expert_weights_norm`: whether the chosen weights are renormalised.
    pub expert_weights_norm: Option<bool>,
}

/// True when `bytes` start with GGUF's magic.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GGUF")
}

/// Reads one layer's tensors out of a parsed file, naming the file in every error.
struct LayerReader<'f, 'a> {
    file: &'f GgufFile<'a>,
    origin: &'f str,
    prefix: &'f str,
}

impl<'a> LayerReader<'_, 'a> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn error(&self, name: &str, message: impl std::fmt::Display) -> MoeError {
        MoeError::tensor(name, format!("in `{}`: {message}", self.origin))
    }

    fn tensor(&self, key: &str) -> Option<&GgufTensor<'a>> {
        self.file.tensor(&self.name(key))
    }

    /// The tensor's stored format, or an error naming it and its type.
    fn format(&self, tensor: &GgufTensor<'_>) -> Result<WeightFormat> {
        WeightFormat::from_ggml_type(tensor.type_id).ok_or_else(|| {
            let type_name = ggml_type_name(tensor.type_id).unwrap_or("unknown");
            self.error(
                &tensor.name,
                format!(
                    "type {type_name} (id {}) is not supported; stored formats: F32, F16, BF16, \
                     Q8_0, Q4_0, Q4_K, Q6_K, MXFP4",
                    tensor.type_id
                ),
            )
        })
    }

    /// `tensor`'s dims, outermost first (the native shape), checked against `expected`
    /// (outermost first), whose sizes `dims_from` says the origin of.
    fn check_dims(
        &self,
        tensor: &GgufTensor<'_>,
        expected: &[usize],
        dims_from: &str,
    ) -> Result<()> {
        let shape: Vec<u64> = tensor.dims.iter().rev().copied().collect();
        if shape
            .iter()
            .map(|&d| d as usize)
            .ne(expected.iter().copied())
        {
            return Err(self.error(
                &tensor.name,
                format!("shape {shape:?} (outermost first), expected {expected:?} ({dims_from})"),
            ));
        }
        Ok(())
    }

    /// The stacked expert matrices `key`, `[count, rows, cols]`, as stored.
    fn experts(
        &self,
        key: &str,
        dims: [usize; 3],
        dims_from: &str,
    ) -> Result<Option<ExpertMatrices>> {
        let Some(tensor) = self.tensor(key) else {
            return Ok(None);
        };
        self.check_dims(tensor, &dims, dims_from)?;
        let format = self.format(tensor)?;
        let matrices =
            ExpertMatrices::from_stored(format, dims, tensor.data.to_vec(), &tensor.name)
                .map_err(|e| self.error(&tensor.name, strip_tensor(e)))?;
        if let Some(values) = matrices.f32_values() {
            check_finite(&tensor.name, values)
                .map_err(|e| self.error(&tensor.name, strip_tensor(e)))?;
        }
        Ok(Some(matrices))
    }

    /// A small tensor (router, bias) of native shape `dims`, decoded to f32.
    fn vector(&self, key: &str, dims: &[usize], dims_from: &str) -> Result<Option<Vec<f32>>> {
        let Some(tensor) = self.tensor(key) else {
            return Ok(None);
        };
        self.check_dims(tensor, dims, dims_from)?;
        let format = self.format(tensor)?;
        let (rows, cols) = match dims {
            [rows, cols] => (*rows, *cols),
            _ => (1, dims.iter().product()),
        };
        let values = ExpertMatrices::from_stored(
            format,
            [1, rows, cols],
            tensor.data.to_vec(),
            &tensor.name,
        )
        .map_err(|e| self.error(&tensor.name, strip_tensor(e)))?
        .to_f32();
        check_finite(&tensor.name, &values)
            .map_err(|e| self.error(&tensor.name, strip_tensor(e)))?;
        Ok(Some(values))
    }
}

impl LayerReader<'_, '_> {
    /// The shared expert, if `ffn_up_shexp.weight` is there: gated like the routed experts
    /// (`gated`), of the width its up projection `[D, Fs]` (dims innermost first) gives.
    fn shared(&self, d: usize, gated: bool, router_name: &str) -> Result<Option<SharedExpert>> {
        const UP: &str = "ffn_up_shexp.weight";
        let Some(up) = self.tensor(UP) else {
            return Ok(None);
        };
        let fs = match up.dims[..] {
            [_, fs] => fs as usize,
            _ => return Err(self.error(&up.name, format!("dims {:?}, expected [D, Fs]", up.dims))),
        };
        let dims_from = format!("D = {d} from `{router_name}`, Fs = {fs} from `{}`", up.name);
        let required = |key: &str, dims: &[usize]| {
            self.vector(key, dims, &dims_from)?.ok_or_else(|| {
                MoeError::tensor(&self.name(key), format!("missing in `{}`", self.origin))
            })
        };
        let (w1, w3) = if gated {
            (
                required("ffn_gate_shexp.weight", &[fs, d])?,
                Some(required(UP, &[fs, d])?),
            )
        } else {
            (required(UP, &[fs, d])?, None)
        };
        Ok(Some(SharedExpert {
            d_ff: fs,
            w1,
            b1: None,
            w2: required("ffn_down_shexp.weight", &[d, fs])?,
            b2: None,
            w3,
            b3: None,
            gate: self.vector("ffn_gate_inp_shexp.weight", &[1, d], &dims_from)?,
        }))
    }
}

/// The message of a tensor error (the reader names the tensor and the file itself).
fn strip_tensor(error: MoeError) -> String {
    match error {
        MoeError::Tensor { message, .. } => message,
        other => other.to_string(),
    }
}

/// The prefix of the one MoE layer in `file`, or an error listing what is there.
fn find_prefix(file: &GgufFile<'_>, origin: &str) -> Result<String> {
    let prefixes: Vec<&str> = file
        .tensors
        .iter()
        .filter_map(|t| t.name.strip_suffix(ROUTER))
        .collect();
    match prefixes.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(MoeError::file(
            origin,
            format!("holds no MoE layer (no tensor named `...{ROUTER}`)"),
        )),
        several => {
            let shown: Vec<&str> = several.iter().take(4).copied().collect();
            Err(MoeError::file(
                origin,
                format!(
                    "holds {} MoE layers ({}{}): give the layer's prefix (--prefix blk.N.)",
                    several.len(),
                    shown.join(", "),
                    if several.len() > 4 { ", …" } else { "" }
                ),
            ))
        }
    }
}

impl MoeWeights {
    /// Loads one MoE layer from a GGUF file, mapped rather than read; see
    /// [`MoeWeights::from_gguf_bytes`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_gguf(
        path: impl AsRef<std::path::Path>,
        prefix: Option<&str>,
    ) -> Result<(Self, GgufLayerInfo)> {
        let path = path.as_ref();
        let bytes = crate::tensor_io::map_file(path)?;
        Self::from_gguf_bytes(&bytes, prefix, &path.display().to_string())
    }

    /// Loads the MoE layer under `prefix` (`blk.3.`; optional when the file holds one MoE
    /// layer) from GGUF bytes, with what the metadata says of its experts. `origin` names
    /// the bytes in errors.
    pub fn from_gguf_bytes(
        bytes: &[u8],
        prefix: Option<&str>,
        origin: &str,
    ) -> Result<(Self, GgufLayerInfo)> {
        let file = GgufFile::parse(bytes, origin)?;
        let prefix = match prefix {
            Some(prefix) => prefix.to_string(),
            None => find_prefix(&file, origin)?,
        };
        let reader = LayerReader {
            file: &file,
            origin,
            prefix: &prefix,
        };
        let router_name = reader.name(ROUTER);
        let router = reader.tensor(ROUTER).ok_or_else(|| {
            MoeError::tensor(
                &router_name,
                format!("missing in `{origin}` (the layer's router)"),
            )
        })?;
        let [d, n] = router.dims[..] else {
            return Err(reader.error(
                &router_name,
                format!("dims {:?}, expected [D, N]", router.dims),
            ));
        };
        let (n, d) = (n as usize, d as usize);
        let gated = reader.tensor("ffn_gate_exps.weight").is_some();
        let w1_key = if gated {
            "ffn_gate_exps.weight"
        } else {
            "ffn_up_exps.weight"
        };
        let w1_tensor = reader.tensor(w1_key).ok_or_else(|| {
            MoeError::tensor(&reader.name(w1_key), format!("missing in `{origin}`"))
        })?;
        let f = match w1_tensor.dims[..] {
            [_, f, _] => f as usize,
            _ => {
                return Err(reader.error(
                    &w1_tensor.name,
                    format!("dims {:?}, expected [D, F, N]", w1_tensor.dims),
                ))
            }
        };
        let dims_from = format!(
            "N = {n}, D = {d} from `{router_name}`, F = {f} from `{}`",
            w1_tensor.name
        );
        let required = |key: &str, dims: [usize; 3]| {
            reader.experts(key, dims, &dims_from)?.ok_or_else(|| {
                MoeError::tensor(&reader.name(key), format!("missing in `{origin}`"))
            })
        };
        let (w3_key, b1_key, b3_key) = if gated {
            (
                Some("ffn_up_exps.weight"),
                "ffn_gate_exps.bias",
                Some("ffn_up_exps.bias"),
            )
        } else {
            (None, "ffn_up_exps.bias", None)
        };
        let weights = MoeWeights {
            shape: LayerShape {
                num_experts: n,
                d_model: d,
                d_ff: f,
            },
            router_weight: reader
                .vector(ROUTER, &[n, d], &dims_from)?
                .ok_or_else(|| MoeError::tensor(&router_name, "missing"))?,
            router_bias: reader.vector("ffn_gate_inp.bias", &[n], &dims_from)?,
            // llama.cpp's name for DeepSeek-V3's selection bias.
            score_bias: reader.vector("exp_probs_b.bias", &[n], &dims_from)?,
            w1: required(w1_key, [n, f, d])?,
            b1: reader.vector(b1_key, &[n, f], &dims_from)?,
            w2: required("ffn_down_exps.weight", [n, d, f])?,
            b2: reader.vector("ffn_down_exps.bias", &[n, d], &dims_from)?,
            w3: match w3_key {
                Some(key) => Some(required(key, [n, f, d])?),
                None => None,
            },
            b3: match b3_key {
                Some(key) => reader.vector(key, &[n, f], &dims_from)?,
                None => None,
            },
            shared: reader.shared(d, gated, &router_name)?,
        };
        weights.check()?;
        let architecture = file
            .metadata
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let value = |key: &str| {
            let arch = architecture.as_deref()?;
            file.metadata.get(&format!("{arch}.{key}"))
        };
        let count = |key: &str| usize::try_from(value(key)?.as_u64()?).ok();
        if let (Some(arch), Some(count)) = (&architecture, count("expert_count")) {
            if count != n {
                return Err(MoeError::file(
                    origin,
                    format!(
                        "`{arch}.expert_count` is {count}, but `{router_name}` has {n} experts"
                    ),
                ));
            }
        }
        let info = GgufLayerInfo {
            expert_count: count("expert_count"),
            expert_used_count: count("expert_used_count"),
            expert_group_count: count("expert_group_count"),
            expert_group_used_count: count("expert_group_used_count"),
            expert_gating_func: value("expert_gating_func").and_then(|v| v.as_u64()),
            expert_weights_scale: value("expert_weights_scale").and_then(|v| v.as_f64()),
            expert_weights_norm: value("expert_weights_norm").and_then(|v| v.as_bool()),
            prefix,
            architecture: architecture.clone(),
        };
        Ok((weights, info))
    }
}
