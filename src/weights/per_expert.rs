//! The namings that store one tensor per expert (labml_nn, Hugging Face Switch, Mixtral
//! and the families' published checkpoints): their names, and reading them stacked.

use super::tensor_source::{rank2, TensorSource};
use super::{LayerShape, MoeWeights};
use crate::error::{MoeError, Result};

impl MoeWeights {
    pub(super) fn read_per_expert(
        source: &mut TensorSource<'_>,
        keys: &PerExpertKeys,
    ) -> Result<Self> {
        let router_shape = source.shape_of(keys.router_weight)?;
        let router_name = source.full_name(keys.router_weight);
        let (n, d) = rank2(&router_name, &router_shape, "[N, D]")?;
        let first_w1 = source.full_name(&keys.expert(0, keys.w1));
        let w1_shape = source.shape_of(&keys.expert(0, keys.w1))?;
        let (f, _) = rank2(&first_w1, &w1_shape, "[F, D]")?;
        source.dims_from =
            format!("N, D from `{router_name}` {router_shape:?}, F from `{first_w1}` {w1_shape:?}");
        let shape = LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        };
        let required = |source: &mut TensorSource<'_>, part: &str, dims: [usize; 2], meaning| {
            source
                .per_expert(n, |i| keys.expert(i, part), dims, meaning)?
                .ok_or_else(|| {
                    MoeError::tensor(&source.full_name(&keys.expert(0, part)), "missing")
                })
        };
        let w1 = required(source, keys.w1, [f, d], "[F, D]")?;
        let w2 = required(source, keys.w2, [d, f], "[D, F]")?;
        let w3 = match keys.w3 {
            Some(part) => source.per_expert(n, |i| keys.expert(i, part), [f, d], "[F, D]")?,
            None => None,
        };
        let optional = |source: &mut TensorSource<'_>, part: Option<&str>, len: usize| match part {
            Some(part) => source.per_expert_vector(n, |i| keys.expert(i, part), len),
            None => Ok(None),
        };
        Ok(MoeWeights {
            shape,
            router_weight: source.required(keys.router_weight, &[n, d], "[N, D]")?,
            router_bias: match keys.router_bias {
                Some(key) => source.optional(key, &[n], "[N]")?,
                None => None,
            },
            score_bias: None,
            w1,
            b1: optional(source, keys.b1, f)?,
            w2,
            b2: optional(source, keys.b2, d)?,
            w3,
            b3: optional(source, keys.b3, f)?,
            shared: None,
        })
    }
}

/// Tensor names of a naming that stores one tensor per expert.
pub(super) struct PerExpertKeys {
    router_weight: &'static str,
    router_bias: Option<&'static str>,
    /// `experts.{i}.` or `experts.expert_{i}.` before the part name.
    expert_marker: &'static str,
    w1: &'static str,
    b1: Option<&'static str>,
    w2: &'static str,
    b2: Option<&'static str>,
    w3: Option<&'static str>,
    b3: Option<&'static str>,
}

impl PerExpertKeys {
    fn expert(&self, index: usize, part: &str) -> String {
        format!("experts.{}{index}.{part}", self.expert_marker)
    }
}

pub(super) const LABML_KEYS: PerExpertKeys = PerExpertKeys {
    router_weight: "switch.weight",
    router_bias: Some("switch.bias"),
    expert_marker: "",
    w1: "layer1.weight",
    b1: Some("layer1.bias"),
    w2: "layer2.weight",
    b2: Some("layer2.bias"),
    w3: Some("linear_v.weight"),
    b3: Some("linear_v.bias"),
};

pub(super) const HF_SWITCH_KEYS: PerExpertKeys = PerExpertKeys {
    router_weight: "router.classifier.weight",
    router_bias: Some("router.classifier.bias"),
    expert_marker: "expert_",
    w1: "wi.weight",
    b1: Some("wi.bias"),
    w2: "wo.weight",
    b2: Some("wo.bias"),
    w3: None,
    b3: None,
};

pub(super) const HF_FAMILY_KEYS: PerExpertKeys = PerExpertKeys {
    router_weight: "gate.weight",
    router_bias: None,
    expert_marker: "",
    w1: "gate_proj.weight",
    b1: None,
    w2: "down_proj.weight",
    b2: None,
    w3: Some("up_proj.weight"),
    b3: None,
};

pub(super) const HF_MIXTRAL_KEYS: PerExpertKeys = PerExpertKeys {
    router_weight: "gate.weight",
    router_bias: None,
    expert_marker: "",
    w1: "w1.weight",
    b1: None,
    w2: "w2.weight",
    b2: None,
    w3: Some("w3.weight"),
    b3: None,
};
