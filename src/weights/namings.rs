//! Loading `MoeWeights` from safetensors in every naming people's checkpoints use: the
//! naming is detected from the tensor names, an optional prefix picks one layer out of a
//! whole model, F32/F16/BF16 expert tensors are kept as stored (read through
//! `tensor_source`).

use std::collections::{BTreeMap, BTreeSet};

use super::per_expert::{HF_FAMILY_KEYS, HF_MIXTRAL_KEYS, HF_SWITCH_KEYS, LABML_KEYS};
use super::tensor_source::{rank2, rank3, TensorSource};
use super::transposed::{Transposed, TRANSPOSED_KEYS};
use super::{LayerShape, MoeWeights, SharedExpert, SHARED_NAMES};
use crate::config::Naming;
use crate::error::{MoeError, Result};
#[cfg(not(target_arch = "wasm32"))]
use crate::tensor_io::map_file;
use crate::tensor_io::parse_safetensors;

/// The naming (and for Mixtral, the layout) a weight file was found to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layout {
    Native,
    Labml,
    HfSwitch,
    /// transformers 4.x and published checkpoints: `experts.{i}.w1|w2|w3.weight`.
    HfMixtralPerExpert,
    /// The families' published checkpoints (DeepSeek, GLM, Qwen, OLMoE):
    /// `experts.{i}.gate_proj|up_proj|down_proj.weight`, with the 5.x router and shared
    /// expert names.
    HfFamilyPerExpert,
    /// transformers 5.x: `experts.gate_up_proj`, `experts.down_proj`.
    HfMixtralStacked,
    /// `gate.weight`: Mixtral's router, shared by both Mixtral layouts.
    HfMixtralRouter,
    /// transformers' gpt-oss: `router.*` with `experts.gate_up_proj [N, D, 2F]` and biases.
    HfGptOss,
    /// transformers' Llama 4: `router.weight` with `experts.gate_up_proj [N, D, 2F]`, no
    /// biases, and `shared_expert.*`.
    HfLlama4,
}

impl Layout {
    fn naming(self) -> Naming {
        match self {
            Layout::Native => Naming::Native,
            Layout::Labml => Naming::Labml,
            Layout::HfSwitch => Naming::HfSwitch,
            Layout::HfMixtralPerExpert
            | Layout::HfFamilyPerExpert
            | Layout::HfMixtralStacked
            | Layout::HfMixtralRouter
            | Layout::HfGptOss
            | Layout::HfLlama4 => Naming::HfMixtral,
        }
    }
}

/// Splits `experts.{i}.{rest}` (or `experts.expert_{i}.{rest}` with `marker = "expert_"`).
fn expert_key<'k>(key: &'k str, marker: &str) -> Option<(usize, &'k str)> {
    let tail = key.strip_prefix("experts.")?.strip_prefix(marker)?;
    let (index, rest) = tail.split_once('.')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((index.parse().ok()?, rest))
}

/// Which layout a (prefix-stripped) tensor name belongs to, if any.
fn layout_of(key: &str) -> Option<Layout> {
    const NATIVE: [&str; 9] = [
        "router.weight",
        "router.bias",
        "router.score_bias",
        "experts.w1",
        "experts.b1",
        "experts.w2",
        "experts.b2",
        "experts.w3",
        "experts.b3",
    ];
    if NATIVE.contains(&key) || SHARED_NAMES.contains(&key) {
        return Some(Layout::Native);
    }
    match key {
        "switch.weight" | "switch.bias" => return Some(Layout::Labml),
        "router.classifier.weight" | "router.classifier.bias" => return Some(Layout::HfSwitch),
        "gate.weight"
        | "gate.e_score_correction_bias"
        | "gate.moe_statics.e_score_correction_bias"
        | "shared_expert_gate.weight" => return Some(Layout::HfMixtralRouter),
        "experts.gate_up_proj" | "experts.down_proj" => return Some(Layout::HfMixtralStacked),
        _ => {}
    }
    // transformers 5.x's shared expert (DeepSeek, GLM, ERNIE: shared_experts; Qwen2-MoE:
    // shared_expert), read with the stacked experts.
    if let Some(projection) = key
        .strip_prefix("shared_experts.")
        .or_else(|| key.strip_prefix("shared_expert."))
    {
        if matches!(
            projection,
            "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
        ) {
            return Some(Layout::HfMixtralRouter);
        }
    }
    if let Some((_, rest)) = expert_key(key, "expert_") {
        if matches!(rest, "wi.weight" | "wi.bias" | "wo.weight" | "wo.bias") {
            return Some(Layout::HfSwitch);
        }
    }
    if let Some((_, rest)) = expert_key(key, "") {
        let labml = [
            "layer1.weight",
            "layer1.bias",
            "layer2.weight",
            "layer2.bias",
            "linear_v.weight",
            "linear_v.bias",
        ];
        if labml.contains(&rest) {
            return Some(Layout::Labml);
        }
        if matches!(rest, "w1.weight" | "w2.weight" | "w3.weight") {
            return Some(Layout::HfMixtralPerExpert);
        }
        if matches!(
            rest,
            "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
        ) {
            return Some(Layout::HfFamilyPerExpert);
        }
    }
    None
}

impl MoeWeights {
    /// Loads a safetensors file, mapped rather than read (host memory holds the layer's
    /// tensors once, as stored); see [`MoeWeights::from_safetensors_bytes`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_safetensors(
        path: impl AsRef<std::path::Path>,
        naming: Naming,
        prefix: Option<&str>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let bytes = map_file(path)?;
        Self::from_safetensors_bytes(&bytes, naming, prefix, &path.display().to_string())
    }

    /// Loads weights from safetensors bytes in any supported naming (`Naming::Auto`
    /// detects it). With a `prefix`, only tensors whose names start with it are read
    /// (a whole model's state dict); without one, every tensor must belong to the layer.
    /// `origin` names the bytes in errors.
    pub fn from_safetensors_bytes(
        bytes: &[u8],
        naming: Naming,
        prefix: Option<&str>,
        origin: &str,
    ) -> Result<Self> {
        let file = parse_safetensors(bytes, origin)?;
        let prefix = prefix.unwrap_or("");
        let mut layouts: BTreeMap<Layout, String> = BTreeMap::new();
        let mut names = file.names();
        names.sort();
        let mut considered = 0;
        let has = |key: &str| file.tensor(&format!("{prefix}{key}")).is_ok();
        let transposed = Transposed::of(has);
        for name in names {
            let Some(key) = name.strip_prefix(prefix) else {
                continue;
            };
            considered += 1;
            let layout = match transposed {
                Some(Transposed::GptOss) if TRANSPOSED_KEYS.contains(&key) => {
                    Some(Layout::HfGptOss)
                }
                Some(Transposed::Llama4) if TRANSPOSED_KEYS.contains(&key) => {
                    Some(Layout::HfLlama4)
                }
                _ => layout_of(key),
            };
            let layout = layout.ok_or_else(|| {
                MoeError::tensor(
                    name,
                    "not a tensor of any known MoE naming (native, labml, hf_switch, hf_mixtral \
                     and the families' transformers names); for a whole model's state dict, \
                     give the layer's prefix",
                )
            })?;
            layouts.entry(layout).or_insert_with(|| name.to_string());
        }
        if considered == 0 {
            return Err(MoeError::Naming {
                message: if prefix.is_empty() {
                    format!("`{origin}` holds no tensors")
                } else {
                    format!("no tensor in `{origin}` starts with the prefix `{prefix}`")
                },
            });
        }
        let layout = Self::single_layout(&layouts)?;
        if naming == Naming::Gguf {
            return Err(MoeError::Naming {
                message: format!("the config asks for gguf, but `{origin}` is a safetensors file"),
            });
        }
        if naming != Naming::Auto && naming != layout.naming() {
            return Err(MoeError::Naming {
                message: format!(
                    "the config asks for {naming:?} but the tensors use {:?} (e.g. `{}`)",
                    layout.naming(),
                    layouts.values().next().map(String::as_str).unwrap_or("")
                ),
            });
        }
        let mut source = TensorSource {
            file: &file,
            prefix,
            used: BTreeSet::new(),
            dims_from: String::new(),
        };
        let weights = match layout {
            Layout::Native => Self::read_native(&mut source)?,
            Layout::Labml => Self::read_per_expert(&mut source, &LABML_KEYS)?,
            Layout::HfSwitch => Self::read_per_expert(&mut source, &HF_SWITCH_KEYS)?,
            Layout::HfMixtralPerExpert | Layout::HfMixtralRouter => {
                Self::read_per_expert(&mut source, &HF_MIXTRAL_KEYS)?
            }
            Layout::HfFamilyPerExpert => {
                let weights = Self::read_per_expert(&mut source, &HF_FAMILY_KEYS)?;
                let LayerShape {
                    num_experts: n,
                    d_model: d,
                    ..
                } = weights.shape;
                MoeWeights {
                    score_bias: Self::read_hf_score_bias(&mut source, n)?,
                    shared: Self::read_hf_shared(&mut source, d)?,
                    ..weights
                }
            }
            Layout::HfMixtralStacked => Self::read_mixtral_stacked(&mut source)?,
            Layout::HfGptOss => Self::read_gpt_oss(&mut source)?,
            Layout::HfLlama4 => Self::read_llama4(&mut source)?,
        };
        // Everything of the layer must have been used: an extra expert or tensor is an error.
        for name in file.names() {
            if name.starts_with(prefix) && !source.used.contains(name) {
                return Err(MoeError::tensor(
                    name,
                    format!(
                        "unexpected for a {:?} layer with {} experts",
                        layout.naming(),
                        weights.shape.num_experts
                    ),
                ));
            }
        }
        weights.check()?;
        Ok(weights)
    }

    /// The one layout the names agree on, or an error naming two names that disagree.
    fn single_layout(layouts: &BTreeMap<Layout, String>) -> Result<Layout> {
        let mut found: Vec<(Layout, &String)> = layouts.iter().map(|(l, n)| (*l, n)).collect();
        // Mixtral's router name is shared by both Mixtral layouts.
        if found.len() > 1 {
            found.retain(|(l, _)| *l != Layout::HfMixtralRouter);
        }
        match found.as_slice() {
            [(layout, _)] => Ok(*layout),
            [(a, name_a), (b, name_b), ..] => Err(MoeError::Naming {
                message: format!("mixed namings: `{name_a}` is {a:?} but `{name_b}` is {b:?}"),
            }),
            [] => Err(MoeError::Naming {
                message: "no tensors".to_string(),
            }),
        }
    }

    fn read_native(source: &mut TensorSource<'_>) -> Result<Self> {
        let router_shape = source.shape_of("router.weight")?;
        let (n, d) = rank2(&source.full_name("router.weight"), &router_shape, "[N, D]")?;
        let w1_shape = source.shape_of("experts.w1")?;
        let (_, f, _) = rank3(&source.full_name("experts.w1"), &w1_shape, "[N, F, D]")?;
        source.dims_from = format!(
            "N, D from `{}` {router_shape:?}, F from `{}` {w1_shape:?}",
            source.full_name("router.weight"),
            source.full_name("experts.w1")
        );
        let shape = LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        };
        let missing = |source: &TensorSource<'_>, key: &str| {
            MoeError::tensor(&source.full_name(key), "missing")
        };
        Ok(MoeWeights {
            shape,
            router_weight: source.required("router.weight", &[n, d], "[N, D]")?,
            router_bias: source.optional("router.bias", &[n], "[N]")?,
            score_bias: source.optional("router.score_bias", &[n], "[N]")?,
            w1: source
                .experts("experts.w1", [n, f, d], "[N, F, D]")?
                .ok_or_else(|| missing(source, "experts.w1"))?,
            b1: source.optional("experts.b1", &[n, f], "[N, F]")?,
            w2: source
                .experts("experts.w2", [n, d, f], "[N, D, F]")?
                .ok_or_else(|| missing(source, "experts.w2"))?,
            b2: source.optional("experts.b2", &[n, d], "[N, D]")?,
            w3: source.experts("experts.w3", [n, f, d], "[N, F, D]")?,
            b3: source.optional("experts.b3", &[n, f], "[N, F]")?,
            shared: Self::read_native_shared(source, d)?,
        })
    }

    /// DeepSeek-V3's and GLM-4.5's selection bias, if there (transformers 5.x names it so;
    /// ERNIE 4.5 keeps it as `[1, N]` in the router's moe_statics).
    fn read_hf_score_bias(source: &mut TensorSource<'_>, n: usize) -> Result<Option<Vec<f32>>> {
        match source.optional("gate.e_score_correction_bias", &[n], "[N]")? {
            Some(bias) => Ok(Some(bias)),
            None => source.optional(
                "gate.moe_statics.e_score_correction_bias",
                &[1, n],
                "[1, N]",
            ),
        }
    }

    /// transformers 5.x's shared expert, if there: `shared_experts.*` (DeepSeek, GLM, ERNIE)
    /// or `shared_expert.*` with `shared_expert_gate.weight` (Qwen2-MoE), each an MLP of
    /// `gate_proj [Fs, D]`, `up_proj [Fs, D]`, `down_proj [D, Fs]`.
    pub(super) fn read_hf_shared(
        source: &mut TensorSource<'_>,
        d: usize,
    ) -> Result<Option<SharedExpert>> {
        let Some(base) = ["shared_experts", "shared_expert"]
            .into_iter()
            .find(|base| source.shape_of(&format!("{base}.gate_proj.weight")).is_ok())
        else {
            return Ok(None);
        };
        let key = |projection: &str| format!("{base}.{projection}.weight");
        let gate_shape = source.shape_of(&key("gate_proj"))?;
        let (fs, _) = rank2(&source.full_name(&key("gate_proj")), &gate_shape, "[Fs, D]")?;
        Ok(Some(SharedExpert {
            d_ff: fs,
            w1: source.required(&key("gate_proj"), &[fs, d], "[Fs, D]")?,
            b1: None,
            w2: source.required(&key("down_proj"), &[d, fs], "[D, Fs]")?,
            b2: None,
            w3: Some(source.required(&key("up_proj"), &[fs, d], "[Fs, D]")?),
            b3: None,
            gate: source.optional("shared_expert_gate.weight", &[1, d], "[1, D]")?,
        }))
    }

    /// The native `shared.*` tensors, if `shared.w1` is there (any other without it is
    /// left unused, hence an error naming it).
    fn read_native_shared(source: &mut TensorSource<'_>, d: usize) -> Result<Option<SharedExpert>> {
        let Ok(w1_shape) = source.shape_of("shared.w1") else {
            return Ok(None);
        };
        let (fs, _) = rank2(&source.full_name("shared.w1"), &w1_shape, "[Fs, D]")?;
        Ok(Some(SharedExpert {
            d_ff: fs,
            w1: source.required("shared.w1", &[fs, d], "[Fs, D]")?,
            b1: source.optional("shared.b1", &[fs], "[Fs]")?,
            w2: source.required("shared.w2", &[d, fs], "[D, Fs]")?,
            b2: source.optional("shared.b2", &[d], "[D]")?,
            w3: source.optional("shared.w3", &[fs, d], "[Fs, D]")?,
            b3: source.optional("shared.b3", &[fs], "[Fs]")?,
            gate: source.optional("shared.gate", &[1, d], "[1, D]")?,
        }))
    }

    fn read_mixtral_stacked(source: &mut TensorSource<'_>) -> Result<Self> {
        let router_shape = source.shape_of("gate.weight")?;
        let (n, d) = rank2(&source.full_name("gate.weight"), &router_shape, "[N, D]")?;
        let gate_up_shape = source.shape_of("experts.gate_up_proj")?;
        let name = source.full_name("experts.gate_up_proj");
        let (_, two_f, _) = rank3(&name, &gate_up_shape, "[N, 2F, D]")?;
        if two_f % 2 != 0 {
            return Err(MoeError::tensor(
                &name,
                format!("shape {gate_up_shape:?}: the middle dimension 2F must be even"),
            ));
        }
        let f = two_f / 2;
        source.dims_from = format!(
            "N, D from `{}` {router_shape:?}, 2F from `{name}` {gate_up_shape:?}",
            source.full_name("gate.weight")
        );
        let gate_up = source
            .experts("experts.gate_up_proj", [n, two_f, d], "[N, 2F, D]")?
            .ok_or_else(|| MoeError::tensor(&name, "missing"))?;
        // Rows :F of each expert are the activated gate (w1), rows F: the up projection (w3).
        let (w1, w3) = gate_up.split_rows(f, &name)?;
        let down_name = source.full_name("experts.down_proj");
        Ok(MoeWeights {
            shape: LayerShape {
                num_experts: n,
                d_model: d,
                d_ff: f,
            },
            router_weight: source.required("gate.weight", &[n, d], "[N, D]")?,
            router_bias: None,
            score_bias: Self::read_hf_score_bias(source, n)?,
            shared: Self::read_hf_shared(source, d)?,
            w1,
            b1: None,
            w2: source
                .experts("experts.down_proj", [n, d, f], "[N, D, F]")?
                .ok_or_else(|| MoeError::tensor(&down_name, "missing"))?,
            b2: None,
            w3: Some(w3),
            b3: None,
        })
    }
}
