//! Each backward kernel against its CPU twin of the same name (`cpu_backward_kernels`),
//! through the buffers of a traced backward: every twin is fed the GPU's own inputs (the
//! training forward's tables, and the upstream kernels' outputs), so each kernel is judged
//! alone. Linear kernels get element-wise bounds from the magnitudes of their terms (the
//! twin run on absolute values: |error| ≤ (L + 2)·u·Σ|terms| for a sum of L products, for
//! each side); the gate and hidden kernels, whose exp and activations WGSL computes to a
//! few ulp, bounds relative to the largest value of their tensor.

mod common;

use common::*;
use switch_moe::cpu_backward_kernels::{self as twins, SlotTables};
use switch_moe::gpu::shaders::DROPPED;
use switch_moe::gpu::BackwardTrace;
use switch_moe::rng::SeededRng;
use switch_moe::{
    Activation, DropPolicy, GateOn, Gradients, LayerOptions, LayerShape, LossCoefficients,
    MoeConfig, MoeLayer, MoeWeights,
};

fn abs(values: &[f32]) -> Vec<f32> {
    values.iter().map(|v| v.abs()).collect()
}

/// `|a − b| ≤ 2·(length + 2)·u·magnitude` element-wise.
fn assert_sum_close(what: &str, gpu: &[f32], cpu: &[f32], magnitude: &[f32], length: usize) {
    assert_close(what, gpu, cpu, |i| {
        2.0 * (length + 2) as f64 * U * magnitude[i] as f64 + 1e-30
    });
}

/// `|a − b| ≤ c·u·max|b|` over the tensor, at the elements `keep` selects.
fn assert_norm_close(what: &str, gpu: &[f32], cpu: &[f32], c: f64, keep: impl Fn(usize) -> bool) {
    let largest = cpu.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let pick = |v: &[f32]| {
        v.iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(_, v)| *v)
            .collect::<Vec<_>>()
    };
    assert_close(what, &pick(gpu), &pick(cpu), |_| c * U * largest + 1e-30);
}

fn kernels_case(config: &MoeConfig, (n, d, f): (usize, usize, usize), t: usize, seed: u64) {
    let context = gpu();
    let what = format!("N={n} D={d} F={f} T={t} {config:?}");
    let weights = MoeWeights::random(shape(n, d, f), config.gated, true, seed);
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    let layer = MoeLayer::with_options(&context, config.clone(), &weights, options).unwrap();
    let x = tokens(t, d, seed);
    let dy = SeededRng::new(seed ^ 0xB0).normal_vec(t * d);
    let coefficients = LossCoefficients {
        aux: 0.02,
        z: 0.003,
    };
    let output = layer.forward_train(&x, &[t, d]).unwrap();
    let (gradients, trace) = layer.backward_with_trace(&dy, coefficients).unwrap();
    let slots = trace.slot_token.len();
    let tables = SlotTables {
        num_experts: n,
        slot_token: &trace.slot_token,
        expert_table: &trace.expert_table,
        row_tile: trace.row_tile,
    };
    let kept_slot = |slot: usize| tables.slot_expert(slot).is_some();
    let k = config.top_k;

    // gate_backward
    let gate = twins::gate_backward(
        config,
        coefficients,
        (&x, &dy),
        &trace.logits,
        (&output.routes, &output.gates),
        &trace.assignment_slot,
        &trace.expert_out,
        (&output.counts, &vec![0.0; n]),
        (d, slots),
        (0, false),
    );
    // With gate_on: input, gate_input_backward adds the gates' part (fed the GPU's slot
    // input gradients): the trace holds the sum of the two kernels.
    let mut d_logits = gate.d_logits.clone();
    if config.gates_input() {
        twins::gate_input_backward(
            config,
            (&x, d),
            &trace.logits,
            (&output.routes, &trace.assignment_slot),
            &trace.d_x_slot,
            (n, 0),
            &mut d_logits,
        );
    }
    assert_norm_close(
        &format!("{what}: gate_backward d_logits"),
        &trace.d_logits,
        &d_logits,
        64.0 * (d + n + k) as f64,
        |_| true,
    );
    for slot in (0..slots).filter(|&s| kept_slot(s)) {
        assert_eq!(
            trace.slot_scale[slot], gate.slot_scale[slot],
            "{what}: gate_backward slot_scale[{slot}]"
        );
    }
    assert_close(
        &format!("{what}: gate_backward pass_scale"),
        &trace.pass_scale,
        &gate.pass_scale,
        |i| GATE_RELATIVE * gate.pass_scale[i] as f64,
    );

    check_expert_kernels(
        &what,
        config,
        &weights,
        tables,
        (&x, &dy),
        &trace,
        &gradients,
    );

    // router_backward (fed the GPU's d_logits)
    let (dwr, dbr) = twins::router_backward(&x, &trace.d_logits, (n, n), d);
    let (dwr_abs, dbr_abs) = twins::router_backward(&abs(&x), &abs(&trace.d_logits), (n, n), d);
    assert_sum_close(
        &format!("{what}: router_backward dWr"),
        &gradients.router_weight,
        &dwr,
        &dwr_abs,
        t,
    );
    assert_sum_close(
        &format!("{what}: router_backward dbr"),
        gradients.router_bias.as_ref().unwrap(),
        &dbr,
        &dbr_abs,
        t,
    );

    // combine_backward (fed the GPU's d_logits, slot gradients and pass scales)
    let slot_gate = trace.slot_gate.as_deref();
    let dx = twins::combine_backward(
        Some((&weights.router_weight, &trace.d_logits)),
        (&trace.assignment_slot, k),
        (&trace.d_x_slot, slot_gate),
        &trace.pass_scale,
        &dy,
    );
    let dx_abs = twins::combine_backward(
        Some((&abs(&weights.router_weight), &abs(&trace.d_logits))),
        (&trace.assignment_slot, k),
        (&abs(&trace.d_x_slot), slot_gate),
        &abs(&trace.pass_scale),
        &abs(&dy),
    );
    assert_sum_close(
        &format!("{what}: combine_backward"),
        &gradients.x,
        &dx,
        &dx_abs,
        n + k + 1,
    );
    // The trace is the run's: dropped assignments have no slot.
    assert!(trace
        .assignment_slot
        .iter()
        .zip(&output.routes)
        .all(|(&slot, &e)| slot == DROPPED || (e as usize) < n));
}

/// The five expert kernels of a traced backward against their twins, each fed the GPU's
/// own inputs (slot scales, hidden rows, dA and dV).
fn check_expert_kernels(
    what: &str,
    config: &MoeConfig,
    weights: &MoeWeights,
    tables: SlotTables<'_>,
    (x, dy): (&[f32], &[f32]),
    trace: &BackwardTrace,
    gradients: &Gradients,
) {
    let LayerShape {
        d_model: d,
        d_ff: f,
        ..
    } = weights.shape;
    let kept_slot = |slot: usize| tables.slot_expert(slot).is_some();
    // expert_hidden_backward (fed the GPU's slot scales and kept pre-activations)
    let pre = (&trace.pre_activations[..], trace.pre_gates.as_deref());
    let (d_a, d_v) =
        twins::expert_hidden_backward(config, weights, tables, dy, &trace.slot_scale, pre);
    let keep = |i: usize| kept_slot(i / f);
    assert_norm_close(
        &format!("{what}: expert_hidden_backward dA"),
        &trace.d_a,
        &d_a,
        32.0 * (d + 4) as f64,
        keep,
    );
    if let (Some(gpu), Some(cpu)) = (&trace.d_v, &d_v) {
        assert_norm_close(
            &format!("{what}: expert_hidden_backward dV"),
            gpu,
            cpu,
            32.0 * (d + 4) as f64,
            keep,
        );
    }

    // expert_down_backward (fed the GPU's hidden rows and scales)
    let layer_shape = weights.shape;
    let dw2 =
        twins::expert_down_backward(layer_shape, tables, dy, &trace.slot_scale, &trace.hidden);
    let dw2_abs = twins::expert_down_backward(
        layer_shape,
        tables,
        &abs(dy),
        &abs(&trace.slot_scale),
        &abs(&trace.hidden),
    );
    let rows = trace.assignment_slot.len();
    assert_sum_close(
        &format!("{what}: expert_down_backward dW2"),
        &gradients.w2,
        &dw2,
        &dw2_abs,
        rows,
    );

    // expert_up_backward (fed the GPU's dA and dV)
    let slot_gate = trace.slot_gate.as_deref();
    let x_abs = abs(x);
    let dw1 = twins::expert_up_backward(layer_shape, tables, (x, slot_gate), &trace.d_a);
    let dw1_abs =
        twins::expert_up_backward(layer_shape, tables, (&x_abs, slot_gate), &abs(&trace.d_a));
    assert_sum_close(
        &format!("{what}: expert_up_backward dW1"),
        &gradients.w1,
        &dw1,
        &dw1_abs,
        rows,
    );
    if let Some(gpu_d_v) = &trace.d_v {
        let dw3 = twins::expert_up_backward(layer_shape, tables, (x, slot_gate), gpu_d_v);
        let dw3_abs =
            twins::expert_up_backward(layer_shape, tables, (&x_abs, slot_gate), &abs(gpu_d_v));
        assert_sum_close(
            &format!("{what}: expert_up_backward dW3"),
            gradients.w3.as_ref().unwrap(),
            &dw3,
            &dw3_abs,
            rows,
        );
    }

    // expert_bias_backward (fed the GPU's dA, dV and scales)
    let biases = twins::expert_bias_backward(
        (layer_shape, layer_shape.num_experts),
        tables,
        (dy, &trace.slot_scale),
        (&trace.d_a, trace.d_v.as_deref()),
    );
    let biases_abs = twins::expert_bias_backward(
        (layer_shape, layer_shape.num_experts),
        tables,
        (&abs(dy), &abs(&trace.slot_scale)),
        (&abs(&trace.d_a), trace.d_v.as_deref().map(abs).as_deref()),
    );
    let pairs = [
        (
            "db1",
            gradients.b1.as_ref(),
            Some(&biases.b1),
            Some(&biases_abs.b1),
        ),
        (
            "db2",
            gradients.b2.as_ref(),
            Some(&biases.b2),
            Some(&biases_abs.b2),
        ),
        (
            "db3",
            gradients.b3.as_ref(),
            biases.b3.as_ref(),
            biases_abs.b3.as_ref(),
        ),
    ];
    for (name, gpu, cpu, magnitude) in pairs {
        if let (Some(gpu), Some(cpu), Some(magnitude)) = (gpu, cpu, magnitude) {
            assert_sum_close(
                &format!("{what}: expert_bias_backward {name}"),
                gpu,
                cpu,
                magnitude,
                rows,
            );
        }
    }

    // expert_input_backward (fed the GPU's dA and dV)
    let d_x_slot = twins::expert_input_backward(weights, tables, &trace.d_a, trace.d_v.as_deref());
    let d_x_slot_abs = twins::expert_input_backward(
        &absolute(weights),
        tables,
        &abs(&trace.d_a),
        trace.d_v.as_deref().map(abs).as_deref(),
    );
    assert_sum_close(
        &format!("{what}: expert_input_backward"),
        &trace.d_x_slot,
        &d_x_slot,
        &d_x_slot_abs,
        2 * f,
    );
}

#[test]
fn every_backward_kernel_matches_its_cpu_twin() {
    let cases: Vec<(MoeConfig, (usize, usize, usize), usize)> = vec![
        (config(1), (4, 12, 20), 24),
        (
            MoeConfig {
                activation: Activation::Gelu,
                gated: true,
                ..config(1)
            },
            (3, 9, 14),
            17,
        ),
        (
            MoeConfig {
                activation: Activation::Silu,
                gated: true,
                normalize_top_k: true,
                capacity_factor: 0.5,
                ..config(2)
            },
            (5, 10, 7),
            33,
        ),
        (
            MoeConfig {
                scale_by_prob: false,
                capacity_factor: 0.6,
                ..config(1)
            },
            (3, 8, 6),
            21,
        ),
        (
            MoeConfig {
                activation: Activation::GeluTanh,
                drop_policy: DropPolicy::Zero,
                capacity_factor: 0.5,
                ..config(3)
            },
            (6, 7, 9),
            26,
        ),
        (config(1), (1, 5, 3), 1),
        // DeepSeek-V3's router: sigmoid scores in groups, normalised and scaled, dropping.
        (
            MoeConfig {
                router_score: switch_moe::RouterScore::Sigmoid,
                n_group: Some(4),
                topk_group: Some(2),
                normalize_top_k: true,
                routed_scaling_factor: 2.5,
                capacity_factor: 0.75,
                gated: true,
                activation: Activation::Silu,
                ..config(3)
            },
            (8, 10, 9),
            29,
        ),
        (
            MoeConfig {
                router_score: switch_moe::RouterScore::Sigmoid,
                scale_by_prob: false,
                routed_scaling_factor: 1.5,
                capacity_factor: 0.5,
                ..config(1)
            },
            (3, 8, 6),
            21,
        ),
        // Llama 4's gate on the experts' input (sigmoid, top-1), with biases and dropping.
        (
            MoeConfig {
                router_score: switch_moe::RouterScore::Sigmoid,
                gate_on: GateOn::Input,
                gated: true,
                activation: Activation::Silu,
                capacity_factor: 0.75,
                ..config(1)
            },
            (4, 10, 9),
            23,
        ),
        // ... and on softmax scores, normalised top-2 and scaled.
        (
            MoeConfig {
                gate_on: GateOn::Input,
                normalize_top_k: true,
                routed_scaling_factor: 1.5,
                capacity_factor: 0.6,
                ..config(2)
            },
            (5, 9, 7),
            27,
        ),
    ];
    for (i, (config, dims, t)) in cases.iter().enumerate() {
        kernels_case(config, *dims, *t, 300 + i as u64);
    }
}

/// With a shared expert (two slices, a gate, a router bias): gate_backward's slot scales
/// and the gate's dh, router_backward's rows R = N + 1 (the gate's bias gradient 0) and
/// combine_backward over every choice, each against its twin on the GPU's own inputs.
#[test]
fn the_backward_kernels_take_a_shared_expert_as_their_twins_do() {
    use switch_moe::weights::SharedExpert;
    let context = gpu();
    let (n, d, f, fs, t) = (5, 12, 8, 14, 29);
    let config = MoeConfig {
        activation: Activation::Silu,
        gated: true,
        normalize_top_k: true,
        capacity_factor: 0.75,
        ..config(2)
    };
    let mut weights = MoeWeights::random(shape(n, d, f), true, true, 31);
    weights.shared = Some(SharedExpert::random((d, fs), true, true, true, 32));
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    let layer = MoeLayer::with_options(&context, config.clone(), &weights, options).unwrap();
    let x = tokens(t, d, 33);
    let dy = SeededRng::new(34).normal_vec(t * d);
    let coefficients = LossCoefficients {
        aux: 0.02,
        z: 0.003,
    };
    let output = layer.forward_train(&x, &[t, d]).unwrap();
    let (gradients, trace) = layer.backward_with_trace(&dy, coefficients).unwrap();
    let (k, m, rows) = (config.top_k, fs.div_ceil(f), n + 1);
    // Every token's choices as the kernels hold them: its k routed, then the m slices
    // (experts N..N + m) weighed by σ(h_N).
    let mut routes = Vec::new();
    let mut gates = Vec::new();
    for token in 0..t {
        routes.extend_from_slice(&output.routes[token * k..(token + 1) * k]);
        gates.extend_from_slice(&output.gates[token * k..(token + 1) * k]);
        let s = 1.0 / (1.0 + (-trace.logits[token * rows + n]).exp());
        for i in 0..m {
            routes.push((n + i) as u32);
            gates.push(s);
        }
    }
    let slots = trace.slot_token.len();
    let gate = twins::gate_backward(
        &config,
        coefficients,
        (&x, &dy),
        &trace.logits,
        (&routes, &gates),
        &trace.assignment_slot,
        &trace.expert_out,
        (&output.counts, &vec![0.0; n]),
        (d, slots),
        (m, true),
    );
    assert_norm_close(
        "shared: gate_backward d_logits",
        &trace.d_logits,
        &gate.d_logits,
        64.0 * (d + n + k + m) as f64,
        |_| true,
    );
    let tables = SlotTables {
        num_experts: n + m,
        slot_token: &trace.slot_token,
        expert_table: &trace.expert_table,
        row_tile: trace.row_tile,
    };
    // The slices' scales are the kernel's σ(h_N) against the host's σ here (a few ulp
    // apart), the routed ones the forward's gates.
    for slot in (0..slots).filter(|&s| tables.slot_expert(s).is_some()) {
        let (gpu, cpu) = (trace.slot_scale[slot], gate.slot_scale[slot]);
        let tolerance = GATE_RELATIVE * cpu.abs() as f64;
        assert!(
            (gpu as f64 - cpu as f64).abs() <= tolerance,
            "shared: gate_backward slot_scale[{slot}]: {gpu} against {cpu}"
        );
    }
    // router_backward: the routed rows then the gate's; the gate's bias gradient is 0.
    let d_logits = &trace.d_logits;
    let (dwr, dbr) = twins::router_backward(&x, d_logits, (rows, n), d);
    let (dwr_abs, dbr_abs) = twins::router_backward(&abs(&x), &abs(d_logits), (rows, n), d);
    let shared_gradients = gradients.shared.as_ref().unwrap();
    let mut gpu_dwr = gradients.router_weight.clone();
    gpu_dwr.extend(shared_gradients.gate.as_ref().unwrap());
    assert_sum_close("shared: router_backward dWr", &gpu_dwr, &dwr, &dwr_abs, t);
    assert_eq!(dbr[n], 0.0);
    assert_sum_close(
        "shared: router_backward dbr",
        gradients.router_bias.as_ref().unwrap(),
        &dbr[..n],
        &dbr_abs[..n],
        t,
    );
    // combine_backward over the router's R rows and every choice.
    let mut router = weights.router_weight.clone();
    router.extend(weights.shared.as_ref().unwrap().gate.as_ref().unwrap());
    let dx = twins::combine_backward(
        Some((&router, d_logits)),
        (&trace.assignment_slot, k + m),
        (&trace.d_x_slot, None),
        &trace.pass_scale,
        &dy,
    );
    let dx_abs = twins::combine_backward(
        Some((&abs(&router), &abs(d_logits))),
        (&trace.assignment_slot, k + m),
        (&abs(&trace.d_x_slot), None),
        &abs(&trace.pass_scale),
        &abs(&dy),
    );
    assert_sum_close(
        "shared: combine_backward",
        &gradients.x,
        &dx,
        &dx_abs,
        rows + k + m + 1,
    );
}

#[test]
fn optimizer_step_matches_its_cpu_twin() {
    use switch_moe::gpu::parameters::ParameterLayout;
    use switch_moe::Optimizer;
    let context = gpu();
    let config = MoeConfig {
        gated: true,
        ..config(2)
    };
    let weights = MoeWeights::random(shape(3, 8, 6), true, true, 81);
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    let layout = ParameterLayout::new(&weights, None).unwrap();
    for optimizer in [
        Optimizer::adam_w(0.01),
        Optimizer::Sgd {
            learning_rate: 0.05,
            weight_decay: 0.1,
        },
    ] {
        let layer =
            MoeLayer::with_options(&context, config.clone(), &weights, options.clone()).unwrap();
        let x = tokens(20, 8, 82);
        let dy = SeededRng::new(83).normal_vec(x.len());
        let mut parameters = layout.flatten(&weights);
        let mut first = vec![0.0f32; layout.total];
        let mut second = vec![0.0f32; layout.total];
        for step in 1..=3u64 {
            layer.forward_train(&x, &[20, 8]).unwrap();
            let gradients = layer.backward(&dy, LossCoefficients::default()).unwrap();
            // The flat layout's order is the native names' after x.
            let flat: Vec<f32> = gradients.named()[1..]
                .iter()
                .flat_map(|(_, values)| values.iter().copied())
                .collect();
            layer.step(&optimizer).unwrap();
            let params = optimizer.kernel_params(step, layout.total);
            twins::optimizer_step(&params, &mut parameters, &flat, (&mut first, &mut second));
            let gpu = layout.flatten(&layer.trained_weights().unwrap());
            // A few roundings per step (sqrt and the division to within an ulp or two).
            assert_close(
                &format!("{optimizer:?} step {step}"),
                &gpu,
                &parameters,
                |i| 16.0 * U * (parameters[i].abs() as f64 + 0.05),
            );
            // Continue from the GPU's values, so each step is judged alone.
            parameters = gpu;
            if let Some(state) = layer.adam_w_state().unwrap() {
                first = state.first_moments;
                second = state.second_moments;
            }
        }
    }
}

/// After a pre-routed forward (`forward_experts_train`): gate_backward's pre-routed branch
/// against its twin, the expert kernels as above, router_backward writing zeros and
/// combine_backward without the router's term.
fn pre_routed_kernels_case(
    config: &MoeConfig,
    (n, d, f): (usize, usize, usize),
    t: usize,
    k: usize,
    seed: u64,
) {
    let what = format!("pre-routed N={n} D={d} F={f} T={t} k={k} {config:?}");
    let weights = MoeWeights::random(shape(n, d, f), config.gated, true, seed);
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    let layer = MoeLayer::with_options(&gpu(), config.clone(), &weights, options).unwrap();
    let x = tokens(t, d, seed);
    let dy = SeededRng::new(seed ^ 0xB1).normal_vec(t * d);
    let mut rng = SeededRng::new(seed ^ 0xB2);
    let index: Vec<u32> = (0..t * k)
        .map(|_| (rng.next_u64() % n as u64) as u32)
        .collect();
    let weight: Vec<f32> = (0..t * k).map(|_| rng.uniform(1.0)).collect();
    layer
        .forward_experts_train(&x, &[t, d], &index, &weight)
        .unwrap();
    let (gradients, trace) = layer.backward_experts_with_trace(&dy).unwrap();
    let slots = trace.slot_token.len();
    let tables = SlotTables {
        num_experts: n,
        slot_token: &trace.slot_token,
        expert_table: &trace.expert_table,
        row_tile: trace.row_tile,
    };

    // gate_backward: dL/dw in each row's first k columns, the weights as slot scales.
    let gate = twins::gate_backward_pre_routed(
        &dy,
        (&weight, &trace.assignment_slot),
        &trace.expert_out,
        (n, k, d, slots),
    );
    let first_k = |i: usize| i % n < k;
    let (gpu_dw, cpu_dw): (Vec<f32>, Vec<f32>) = (0..t * n)
        .filter(|&i| first_k(i))
        .map(|i| (trace.d_logits[i], gate.d_logits[i]))
        .unzip();
    let dw_abs: Vec<f32> = {
        let abs_gate = twins::gate_backward_pre_routed(
            &abs(&dy),
            (&weight, &trace.assignment_slot),
            &abs(&trace.expert_out),
            (n, k, d, slots),
        );
        (0..t * n)
            .filter(|&i| first_k(i))
            .map(|i| abs_gate.d_logits[i])
            .collect()
    };
    assert_sum_close(
        &format!("{what}: gate_backward dL/dw"),
        &gpu_dw,
        &cpu_dw,
        &dw_abs,
        d,
    );
    assert_eq!(
        gpu_dw, gradients.top_k_weights,
        "{what}: top_k_weights is the trace's"
    );
    for slot in (0..slots).filter(|&s| tables.slot_expert(s).is_some()) {
        assert_eq!(
            trace.slot_scale[slot], gate.slot_scale[slot],
            "{what}: gate_backward slot_scale[{slot}]"
        );
    }
    assert!(
        trace.pass_scale.iter().all(|&p| p == 0.0),
        "{what}: pass_scale"
    );

    check_expert_kernels(
        &what,
        config,
        &weights,
        tables,
        (&x, &dy),
        &trace,
        &gradients.gradients,
    );

    // router_backward: zeros (the router is not in the graph).
    let router = &gradients.gradients;
    assert!(
        router.router_weight.iter().all(|&g| g == 0.0),
        "{what}: dWr"
    );
    assert!(
        router.router_bias.iter().flatten().all(|&g| g == 0.0),
        "{what}: dbr"
    );

    // combine_backward: the slots' input gradients alone.
    let dx = twins::combine_backward(
        None,
        (&trace.assignment_slot, k),
        (&trace.d_x_slot, None),
        &trace.pass_scale,
        &dy,
    );
    let dx_abs = twins::combine_backward(
        None,
        (&trace.assignment_slot, k),
        (&abs(&trace.d_x_slot), None),
        &trace.pass_scale,
        &abs(&dy),
    );
    assert_sum_close(
        &format!("{what}: combine_backward"),
        &router.x,
        &dx,
        &dx_abs,
        k + 1,
    );
}

#[test]
fn pre_routed_backward_kernels_match_their_cpu_twins() {
    let gated = MoeConfig {
        gated: true,
        activation: Activation::Silu,
        ..config(1)
    };
    pre_routed_kernels_case(&config(1), (4, 12, 20), 24, 2, 400);
    pre_routed_kernels_case(&gated, (3, 9, 14), 17, 3, 401);
    pre_routed_kernels_case(&gated, (1, 5, 3), 1, 1, 402);
}
