//! An optimizer's settings and the `Params` of optimizer_step they give (bias corrections
//! computed on the host, in f64, once per step), and AdamW's state as the host saves it.

use crate::error::{MoeError, Result};
use crate::gpu::kernels::params::OptimizerParams;

/// An optimizer and its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `p ← p − lr·(g + weight_decay·p)`.
    Sgd {
        learning_rate: f32,
        weight_decay: f32,
    },
    /// AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias-corrected
    /// moments).
    AdamW {
        learning_rate: f32,
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
    },
}

impl Optimizer {
    /// AdamW with torch's defaults but the learning rate (β = (0.9, 0.999), ε = 1e-8,
    /// weight decay 0.01).
    pub fn adam_w(learning_rate: f32) -> Self {
        Optimizer::AdamW {
            learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.01,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        let values: &[(&str, f32)] = match self {
            Optimizer::Sgd {
                learning_rate,
                weight_decay,
            } => &[
                ("learning_rate", *learning_rate),
                ("weight_decay", *weight_decay),
            ],
            Optimizer::AdamW {
                learning_rate,
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => &[
                ("learning_rate", *learning_rate),
                ("beta1", *beta1),
                ("beta2", *beta2),
                ("epsilon", *epsilon),
                ("weight_decay", *weight_decay),
            ],
        };
        for (key, value) in values {
            if !value.is_finite() || *value < 0.0 {
                return Err(MoeError::config(
                    key,
                    format!("{value}: must be finite and ≥ 0"),
                ));
            }
        }
        if let Optimizer::AdamW { beta1, beta2, .. } = self {
            if *beta1 >= 1.0 || *beta2 >= 1.0 {
                return Err(MoeError::config("beta", "β1 and β2 must be below 1"));
            }
        }
        Ok(())
    }

    /// optimizer_step's params for AdamW step `step` (1-based) over `count` parameters:
    /// the bias corrections computed here, in f64, once per step.
    pub fn kernel_params(&self, step: u64, count: usize) -> OptimizerParams {
        match *self {
            Optimizer::Sgd {
                learning_rate,
                weight_decay,
            } => OptimizerParams {
                count: count as u32,
                kind: 0,
                learning_rate,
                weight_decay,
                ..Default::default()
            },
            Optimizer::AdamW {
                learning_rate,
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => {
                let step = step.min(i32::MAX as u64) as i32;
                let first_correction = 1.0 - (beta1 as f64).powi(step);
                let second_correction = 1.0 - (beta2 as f64).powi(step);
                OptimizerParams {
                    count: count as u32,
                    kind: 1,
                    learning_rate,
                    weight_decay,
                    beta1,
                    beta2,
                    epsilon,
                    step_size: (learning_rate as f64 / first_correction) as f32,
                    second_moment_correction: second_correction.sqrt() as f32,
                    _pad: [0; 3],
                }
            }
        }
    }
}

/// AdamW's state on a layer, to save and to resume training exactly: both moments in the
/// layer's flat parameter order (router.weight, router.bias, w1, b1, w2, b2, w3, b3, each
/// present tensor in its native layout: `gpu::plan::parameters::ParameterLayout`) and the steps
/// taken (for the bias corrections).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    pub first_moments: Vec<f32>,
    pub second_moments: Vec<f32>,
    pub steps: u64,
}
