//! A shared expert (SPEC "The families people run"): a dense FFN of its own width `Fs` that
//! every token goes through, outside the router, the capacity and the drop policy, with the
//! routed experts' activation and gating, optionally weighed by a sigmoid gate of its own
//! (Qwen2-MoE's `shared_expert_gate`): `y[t] = routed[t] + σ(x[t]·gateᵀ)·S(x[t])`.
//! Native names `shared.w1 [Fs, D]`, `shared.w2 [D, Fs]`, `shared.w3 [Fs, D]`,
//! `shared.b1/b3 [Fs]`, `shared.b2 [D]`, `shared.gate [1, D]`. Several shared experts of
//! one layer (DeepSeek's `n_shared_experts`) are one of width their sum.

use crate::error::{MoeError, Result};
use crate::rng::SeededRng;

/// The shared expert's tensors (or, as a gradient, dL/d of each), f32, native layout.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedExpert {
    /// `Fs`.
    pub d_ff: usize,
    /// `[Fs, D]`.
    pub w1: Vec<f32>,
    pub b1: Option<Vec<f32>>,
    /// `[D, Fs]`.
    pub w2: Vec<f32>,
    pub b2: Option<Vec<f32>>,
    /// `[Fs, D]`, gated FFNs only.
    pub w3: Option<Vec<f32>>,
    pub b3: Option<Vec<f32>>,
    /// `[D]` (stored `[1, D]`): the shared gate's weights.
    pub gate: Option<Vec<f32>>,
}

/// A tensor that may be absent, with its native name and shape.
type Named<'a> = (&'static str, Option<&'a Vec<f32>>, Vec<usize>);

/// The native names of the shared tensors.
pub const SHARED_NAMES: [&str; 7] = [
    "shared.w1",
    "shared.b1",
    "shared.w2",
    "shared.b2",
    "shared.w3",
    "shared.b3",
    "shared.gate",
];

impl SharedExpert {
    /// Each tensor held under its native name, in [`SHARED_NAMES`] order.
    pub fn tensors(&self) -> Vec<(&'static str, &[f32])> {
        let d_model = self.w1.len() / self.d_ff.max(1);
        self.named(d_model)
            .into_iter()
            .map(|(name, values, _)| (name, values))
            .collect()
    }

    /// Each tensor held, with its native name and shape, in [`SHARED_NAMES`] order.
    pub fn named(&self, d_model: usize) -> Vec<(&'static str, &[f32], Vec<usize>)> {
        let (d, f) = (d_model, self.d_ff);
        let tensors: [Named<'_>; 7] = [
            ("shared.w1", Some(&self.w1), vec![f, d]),
            ("shared.b1", self.b1.as_ref(), vec![f]),
            ("shared.w2", Some(&self.w2), vec![d, f]),
            ("shared.b2", self.b2.as_ref(), vec![d]),
            ("shared.w3", self.w3.as_ref(), vec![f, d]),
            ("shared.b3", self.b3.as_ref(), vec![f]),
            ("shared.gate", self.gate.as_ref(), vec![1, d]),
        ];
        tensors
            .into_iter()
            .filter_map(|(name, values, dims)| values.map(|v| (name, v.as_slice(), dims)))
            .collect()
    }

    /// Checks every tensor's length and values, and that `w3` is there exactly when the
    /// routed experts are gated (the shared expert computes what they compute).
    pub fn check(&self, d_model: usize, gated: bool) -> Result<()> {
        if self.d_ff == 0 {
            return Err(MoeError::tensor(
                "shared.w1",
                "an empty shared expert (Fs = 0)",
            ));
        }
        for (name, values, dims) in self.named(d_model) {
            let len: usize = dims.iter().product();
            if values.len() != len {
                return Err(MoeError::tensor(
                    name,
                    format!("{} values, expected {len} for {dims:?}", values.len()),
                ));
            }
            if let Some(at) = values.iter().position(|v| !v.is_finite()) {
                return Err(MoeError::tensor(
                    name,
                    format!("non-finite value {} at flat index {at}", values[at]),
                ));
            }
        }
        match (gated, self.w3.is_some()) {
            (true, false) => Err(MoeError::tensor(
                "shared.w3",
                "missing: the routed experts are gated, so the shared expert must be",
            )),
            (false, true) => Err(MoeError::tensor(
                "shared.w3",
                "present, but the routed experts are not gated",
            )),
            _ if self.b3.is_some() && self.w3.is_none() => {
                Err(MoeError::tensor("shared.b3", "present without shared.w3"))
            }
            _ => Ok(()),
        }
    }

    /// Seeded weights drawn like `nn.Linear`'s default init (uniform in ±1/√fan_in).
    pub fn random(
        (d_model, d_ff): (usize, usize),
        gated: bool,
        with_biases: bool,
        with_gate: bool,
        seed: u64,
    ) -> Self {
        let mut rng = SeededRng::new(seed);
        let bound_d = 1.0 / (d_model as f32).sqrt();
        let bound_f = 1.0 / (d_ff as f32).sqrt();
        let w1 = rng.uniform_vec(d_ff * d_model, bound_d);
        let b1 = with_biases.then(|| rng.uniform_vec(d_ff, bound_d));
        let w2 = rng.uniform_vec(d_model * d_ff, bound_f);
        let b2 = with_biases.then(|| rng.uniform_vec(d_model, bound_f));
        let w3 = gated.then(|| rng.uniform_vec(d_ff * d_model, bound_d));
        let b3 = (gated && with_biases).then(|| rng.uniform_vec(d_ff, bound_d));
        let gate = with_gate.then(|| rng.uniform_vec(d_model, bound_d));
        SharedExpert {
            d_ff,
            w1,
            b1,
            w2,
            b2,
            w3,
            b3,
            gate,
        }
    }

    /// `f` of every value, the same tensors held (`|_| 0.0`: the gradient sums' start;
    /// `f32::abs`: the magnitudes that bound rounding errors).
    pub fn map(&self, f: impl Fn(f32) -> f32) -> SharedExpert {
        let each = |v: &Vec<f32>| v.iter().map(|&x| f(x)).collect::<Vec<_>>();
        SharedExpert {
            d_ff: self.d_ff,
            w1: each(&self.w1),
            b1: self.b1.as_ref().map(each),
            w2: each(&self.w2),
            b2: self.b2.as_ref().map(each),
            w3: self.w3.as_ref().map(each),
            b3: self.b3.as_ref().map(each),
            gate: self.gate.as_ref().map(each),
        }
    }
}
