//! Shared test helpers: the GPU context (a missing adapter FAILS the test), seeded layers
//! and inputs, and the comparison of a GPU output with the CPU reference under tolerances
//! derived from f32 accumulation error.
#![allow(dead_code)]

use switch_moe::config::{Activation, HiddenUnit};
use switch_moe::cpu_reference::{self, dot};
use switch_moe::cpu_shared_expert;
use switch_moe::rng::SeededRng;
use switch_moe::{ExpertMatrices, GpuContext, LayerShape, MoeConfig, MoeOutput, MoeWeights};

/// Unit roundoff of f32.
pub const U: f64 = f32::EPSILON as f64 / 2.0;
/// The largest slope of our activations (GELU's is 1.129, SiLU's 1.0998).
pub const ACTIVATION_LIPSCHITZ: f64 = 1.13;
/// Relative error allowed on GPU softmax outputs: WGSL lets `exp` err by a few ulp
/// (more for large arguments), and the division and the N-term sum add a few more.
pub const GATE_RELATIVE: f64 = 64.0 * U;

/// The test device: one context per test thread, so that the layers of a test share the
/// pipelines they would build alike (GL compiles each for seconds); not one for all
/// threads, since wgpu's GL backend gives up on its context lock after six seconds while
/// another thread compiles. With no adapter this panics, and the test fails, saying how to
/// get one.
pub fn gpu() -> GpuContext {
    thread_local! {
        static CONTEXT: std::cell::OnceCell<Result<GpuContext, String>> =
            const { std::cell::OnceCell::new() };
    }
    CONTEXT.with(|context| {
        match context.get_or_init(|| GpuContext::new().map_err(|e| e.to_string())) {
            Ok(context) => context.clone(),
            Err(e) => panic!("GPU tests need an adapter: {e}"),
        }
    })
}

/// Whether the test device is on wgpu's GL backend. llvmpipe's GL compiler takes ~5× its
/// Vulkan driver per pipeline (~10 s for a gated 16×16-block one), so the format matrices
/// that build dozens of distinct pipelines run a representative part there — every
/// format, tiling and path once, not every combination — and all of it on Vulkan (CI's
/// first leg).
pub fn on_gl() -> bool {
    gpu().adapter.get_info().backend == wgpu::Backend::Gl
}

pub fn shape(num_experts: usize, d_model: usize, d_ff: usize) -> LayerShape {
    LayerShape {
        num_experts,
        d_model,
        d_ff,
    }
}

/// Seeded tokens, standard normal.
pub fn tokens(num_tokens: usize, d_model: usize, seed: u64) -> Vec<f32> {
    SeededRng::new(seed ^ 0x005E_ED0F_70C3).normal_vec(num_tokens * d_model)
}

/// A config with `n_experts` unset and the given top-k; other keys at their defaults.
pub fn config(top_k: usize) -> MoeConfig {
    MoeConfig {
        top_k,
        ..MoeConfig::default()
    }
}

/// Asserts `|a - b| ≤ tol[i]` everywhere, naming the first bad index.
pub fn assert_close(
    what: &str,
    actual: &[f32],
    expected: &[f32],
    tolerance: impl Fn(usize) -> f64,
) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (&a, &b)) in actual.iter().zip(expected).enumerate() {
        let tol = tolerance(i);
        let diff = (a as f64 - b as f64).abs();
        assert!(
            diff <= tol,
            "{what}[{i}]: GPU {a} vs CPU {b}, |diff| {diff:e} > tolerance {tol:e}"
        );
    }
}

/// The weights with every value replaced by its absolute value.
pub fn absolute(weights: &MoeWeights) -> MoeWeights {
    let abs = |v: &Vec<f32>| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
    // Stored formats decode first: |decoded value| is what bounds a product's error.
    let abs_matrices =
        |m: &ExpertMatrices| ExpertMatrices::from_f32(m.count, m.rows, m.cols, abs(&m.to_f32()));
    MoeWeights {
        shape: weights.shape,
        router_weight: abs(&weights.router_weight),
        router_bias: weights.router_bias.as_ref().map(abs),
        score_bias: weights.score_bias.clone(),
        w1: abs_matrices(&weights.w1),
        b1: weights.b1.as_ref().map(abs),
        w2: abs_matrices(&weights.w2),
        b2: weights.b2.as_ref().map(abs),
        w3: weights.w3.as_ref().map(abs_matrices),
        b3: weights.b3.as_ref().map(abs),
        shared: weights.shared.as_ref().map(|s| s.map(f32::abs)),
    }
}

/// Per element of y, the bound `Σ_j |s_j|·(|W2|·act_abs(|W1|·|x| + |b1|) ⊙ ... + |b2|)`:
/// the same FFN on absolute values (every activation satisfies |act(a)| ≤ |a|). Rounding
/// errors of any summation order are at most (length · u) times this magnitude.
pub fn magnitude_of_y(
    config: &MoeConfig,
    weights: &MoeWeights,
    x: &[f32],
    reference: &MoeOutput,
) -> Vec<f64> {
    let d_model = weights.shape.d_model;
    let abs_weights = absolute(weights);
    let mut magnitude = vec![0.0f64; x.len()];
    let k = config.top_k;
    let kept_any = kept_choices(config, weights.shape.num_experts, reference);
    for (token, row) in x.chunks_exact(d_model).enumerate() {
        let abs_row: Vec<f32> = row.iter().map(|v| v.abs()).collect();
        for choice in 0..k {
            if !kept_any[token * k + choice] {
                continue;
            }
            let expert = reference.routes[token * k + choice] as usize;
            let gate = reference.gates[token * k + choice];
            // With gate_on: input the FFN on |x| runs on g·|x|, unscaled after.
            let (input, scale) = if config.gates_input() {
                (abs_row.iter().map(|v| gate * v).collect(), 1.0)
            } else if config.scale_by_prob {
                (abs_row.clone(), gate as f64)
            } else {
                (abs_row.clone(), 1.0)
            };
            let h = hidden_magnitude(config, &input, &abs_weights, expert);
            let out = cpu_reference::expert_down(&h, &abs_weights, expert);
            for (m, o) in magnitude[token * d_model..(token + 1) * d_model]
                .iter_mut()
                .zip(&out)
            {
                *m += scale * *o as f64;
            }
        }
    }
    // The shared expert on |x| and |W| (its gate σ(·) ≤ 1).
    if let Some(shared) = &abs_weights.shared {
        let ungated = switch_moe::weights::SharedExpert {
            gate: None,
            ..shared.clone()
        };
        let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        let mut shared_magnitude = vec![0.0f32; x.len()];
        cpu_shared_expert::add_shared_expert(
            &mut shared_magnitude,
            &abs_x,
            &ungated,
            magnitude_unit(config),
        );
        for (m, s) in magnitude.iter_mut().zip(shared_magnitude) {
            *m += s as f64;
        }
    }
    magnitude
}

/// The hidden unit whose values on |x| and |W| bound |h| and the scale of its rounding
/// errors: relu's |a|·|v| (|a| ungated) for activations of slope ≤ 1.13; relu2's |a|², its
/// slope being 2|a|; for swiglu_oai |a|·(|v| + 1), its own formula without clamps and with a
/// sigmoid of 1 (an α past every |a|⁻¹).
pub fn magnitude_unit(config: &MoeConfig) -> HiddenUnit {
    let activation = match config.activation {
        Activation::Relu2 | Activation::SwigluOai => config.activation,
        _ => Activation::Relu,
    };
    HiddenUnit {
        activation,
        swiglu_limit: f32::MAX,
        swiglu_alpha: f32::MAX,
    }
}

/// [`magnitude_unit`]'s hidden row for one token on one expert.
pub fn hidden_magnitude(
    config: &MoeConfig,
    abs_row: &[f32],
    abs_weights: &MoeWeights,
    expert: usize,
) -> Vec<f32> {
    cpu_reference::expert_up(&[abs_row], abs_weights, expert, magnitude_unit(config))
}

/// Relative error of the GPU's activation beyond its inputs' rounding: the GPU's erf
/// (A&S 7.1.26) errs by 1.5e-7 absolute, i.e. ≤ 1e-7·|a| in GELU; silu's and swiglu_oai's
/// sigmoid takes WGSL's exp, which may err by a few ulp more than the f64 reference's.
pub fn activation_relative(activation: Activation) -> f64 {
    match activation {
        Activation::Gelu => 1e-7,
        Activation::Silu | Activation::SwigluOai | Activation::QuickGelu => GATE_RELATIVE,
        _ => 0.0,
    }
}

/// Which assignments the reference keeps (recomputed with its own functions).
pub fn kept_choices(config: &MoeConfig, num_experts: usize, reference: &MoeOutput) -> Vec<bool> {
    let group_size = config.group_size_for(reference.num_tokens()).unwrap();
    let (_, positions) =
        cpu_reference::assign_positions(config, &reference.routes, num_experts, group_size);
    positions.iter().map(|p| p.is_some()).collect()
}

/// The CPU reference, which must succeed.
pub fn cpu_forward(
    config: &MoeConfig,
    weights: &MoeWeights,
    x: &[f32],
    shape: &[usize],
) -> MoeOutput {
    cpu_reference::forward(config, weights, x, shape).expect("CPU reference failed")
}

/// Compares a GPU output with the CPU reference: integers exactly, floats within bounds
/// derived from the accumulation lengths (D for the router and up-projection, F for the
/// down-projection) and the softmax's relative error.
pub fn assert_matches_reference(
    config: &MoeConfig,
    weights: &MoeWeights,
    x: &[f32],
    gpu: &MoeOutput,
    cpu: &MoeOutput,
) {
    let LayerShape {
        num_experts,
        d_model,
        d_ff,
    } = weights.shape;
    let num_tokens = cpu.num_tokens();
    // Routes first: a mismatch is only excusable at a genuine near-tie, which the seeded
    // tests avoid; report the probability gap to tell the two apart.
    for (i, (&g, &c)) in gpu.routes.iter().zip(&cpu.routes).enumerate() {
        assert_eq!(
            g,
            c,
            "routes[{i}] (token {}, choice {}): GPU {g} vs CPU {c}; gates GPU {:?} CPU {:?}",
            i / config.top_k,
            i % config.top_k,
            &gpu.gates[i / config.top_k * config.top_k..][..config.top_k],
            &cpu.gates[i / config.top_k * config.top_k..][..config.top_k],
        );
    }
    assert_eq!(gpu.counts, cpu.counts, "counts");
    assert_eq!(gpu.kept, cpu.kept, "kept");
    assert_eq!(gpu.n_dropped, cpu.n_dropped, "n_dropped");
    assert_eq!(gpu.shape, cpu.shape, "shape");

    let router_magnitude = router_logit_magnitude(weights, x);
    // Logit error 2·γ_D·|h|abs moves p by that much relatively; plus exp/softmax error.
    let prob_relative = 2.0 * (d_model as f64 + 2.0) * U * router_magnitude + GATE_RELATIVE;
    let prob_tolerance = |value: f32| prob_relative * value as f64 + num_experts as f64 * U;
    assert_close("gates", &gpu.gates, &cpu.gates, |i| {
        prob_tolerance(cpu.gates[i])
    });
    assert_close(
        "route_prob_max",
        &gpu.route_prob_max,
        &cpu.route_prob_max,
        |i| prob_tolerance(cpu.route_prob_max[i]),
    );
    let sum_length = num_tokens as f64;
    assert_close(
        "route_prob_sum",
        &gpu.route_prob_sum,
        &cpu.route_prob_sum,
        |i| {
            (prob_relative + sum_length * U) * cpu.route_prob_sum[i] as f64
                + sum_length * num_experts as f64 * U
        },
    );
    assert_close("aux_loss", &[gpu.aux_loss], &[cpu.aux_loss], |_| {
        (prob_relative + (sum_length + num_experts as f64) * U) * cpu.aux_loss as f64 + 1e-30
    });
    // z = mean lse²: Δz ≤ 2|lse|·Δlse with Δlse ≤ 2γ_D·|h|abs + (exp/log error)·|lse|.
    let lse_bound = (cpu.z_loss as f64).sqrt();
    let z_tolerance = 2.0
        * lse_bound
        * (2.0 * (d_model as f64 + 2.0) * U * router_magnitude + GATE_RELATIVE * (lse_bound + 1.0))
        + sum_length * U * cpu.z_loss as f64;
    assert_close("z_loss", &[gpu.z_loss], &[cpu.z_loss], |_| z_tolerance);

    let magnitude = magnitude_of_y(config, weights, x, cpu);
    let gated = if config.gated { 2.0 } else { 1.0 };
    let ffn_relative = (2.0 * ACTIVATION_LIPSCHITZ * gated * (d_model as f64 + 2.0)
        + 2.0 * (d_ff as f64 + 2.0)
        + 16.0)
        * U
        + activation_relative(config.activation);
    // A gate on the input moves a (and v) by its relative error, h by up to
    // Lipschitz·gated times it.
    let gate_relative = if config.gates_input() {
        ACTIVATION_LIPSCHITZ * gated * prob_relative
    } else {
        0.0
    };
    assert_close("y", &gpu.y, &cpu.y, |i| {
        (ffn_relative + gate_relative) * magnitude[i]
            + prob_relative * (cpu.y[i] as f64).abs()
            + 1e-30
    });
}

/// `max_t (Σ_d |x_td|·max_e |Wr_ed| + |br_e|)`: the scale of router logit rounding errors.
pub fn router_logit_magnitude(weights: &MoeWeights, x: &[f32]) -> f64 {
    let d_model = weights.shape.d_model;
    let abs_router: Vec<f32> = weights.router_weight.iter().map(|v| v.abs()).collect();
    let mut largest = 0.0f64;
    for row in x.chunks_exact(d_model) {
        let abs_row: Vec<f32> = row.iter().map(|v| v.abs()).collect();
        for (e, w) in abs_router.chunks_exact(d_model).enumerate() {
            let bias = weights.router_bias.as_ref().map_or(0.0, |b| b[e].abs());
            largest = largest.max((dot(&abs_row, w) + bias) as f64);
        }
    }
    largest
}

/// The words of a caller's buffer (it needs `COPY_SRC`), read back blocking.
pub fn read_words(context: &switch_moe::GpuContext, buffer: &wgpu::Buffer) -> Vec<u32> {
    let staging = context.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test read-back"),
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = context.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    context.queue.submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |result| result.unwrap());
    context
        .device
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    let words = bytemuck::pod_collect_to_vec(&staging.slice(..).get_mapped_range().unwrap()[..]);
    staging.unmap();
    words
}

/// A caller's buffer holding `values`.
pub fn buffer_with(
    context: &switch_moe::GpuContext,
    values: &[f32],
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    wgpu::util::DeviceExt::create_buffer_init(
        &context.device,
        &wgpu::util::BufferInitDescriptor {
            label: Some("caller buffer"),
            contents: bytemuck::cast_slice(values),
            usage,
        },
    )
}

/// GPU gradients against the f64 reference. Each gradient element is a chain of f32 sums
/// (a dot of D or F terms, then a sum over up to T·k rows or N experts), every term with
/// a few roundings: its error is at most about (D + F + T·k + N)·u times the sum of the
/// magnitudes of its terms, bounded here by 8 × the largest magnitude in its tensor times
/// the chain's length.
pub fn assert_gradients_close(
    what: &str,
    gpu: &switch_moe::Gradients,
    cpu: &switch_moe::Gradients,
    depth: usize,
) {
    let gpu_named = gpu.named();
    let cpu_named = cpu.named();
    let names = |n: &[(&'static str, &[f32])]| n.iter().map(|(name, _)| *name).collect::<Vec<_>>();
    assert_eq!(names(&gpu_named), names(&cpu_named), "{what}: tensors");
    for ((name, actual), (_, expected)) in gpu_named.iter().zip(&cpu_named) {
        let largest = expected.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
        let tolerance = 8.0 * depth as f64 * U * largest + 1e-30;
        assert_close(&format!("{what}: {name}"), actual, expected, |_| tolerance);
    }
}
