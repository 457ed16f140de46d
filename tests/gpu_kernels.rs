//! Each GPU kernel against its CPU twin of the same name, through the intermediate buffers
//! of a traced forward: scatter_assignments' slots, expert_up's hidden rows, expert_down's
//! outputs (fed the GPU's own hidden rows, so each kernel is judged alone) and
//! combine_outputs (fed the GPU's own expert outputs).

mod common;

use common::*;
use switch_moe::cpu_reference::{self, Routing};
use switch_moe::gpu::shaders::DROPPED;
use switch_moe::{Activation, MoeConfig, MoeLayer, MoeWeights};

fn traced_case(
    config: &MoeConfig,
    num_experts: usize,
    d_model: usize,
    d_ff: usize,
    num_tokens: usize,
    seed: u64,
) {
    let weights = MoeWeights::random(shape(num_experts, d_model, d_ff), config.gated, true, seed);
    let x = tokens(num_tokens, d_model, seed);
    let layer = MoeLayer::new(&gpu(), config.clone(), &weights).unwrap();
    let (output, trace) = layer
        .forward_with_trace(&x, &[num_tokens, d_model])
        .unwrap();
    let k = config.top_k;

    // route_tokens
    let routing = cpu_reference::route_tokens(&x, &weights, config);
    assert_eq!(output.routes, routing.routes, "route_tokens: routes");

    // count_experts + scan_expert_offsets
    let group_size = config.group_size_for(num_tokens).unwrap();
    let (loads, positions) =
        cpu_reference::assign_positions(config, &output.routes, num_experts, group_size);
    assert_eq!(output.counts, loads.counts, "count_experts");
    assert_eq!(output.kept, loads.kept, "scan_expert_offsets: kept");
    for e in 0..num_experts {
        let tiles = trace.tile_start[e + 1] - trace.tile_start[e];
        assert_eq!(
            tiles,
            loads.kept[e].div_ceil(trace.row_tile),
            "scan_expert_offsets: tiles of expert {e}"
        );
    }

    // scatter_assignments: slot = segment start + CPU position; slot_token inverts it.
    for (assignment, position) in positions.iter().enumerate() {
        let slot = trace.assignment_slot[assignment];
        match position {
            None => assert_eq!(slot, DROPPED, "assignment {assignment} should be dropped"),
            Some(p) => {
                let expert = output.routes[assignment] as usize;
                assert_eq!(
                    slot,
                    trace.tile_start[expert] * trace.row_tile + p,
                    "assignment {assignment}"
                );
                assert_eq!(
                    trace.slot_token[slot as usize] as usize,
                    assignment / k,
                    "slot {slot}"
                );
            }
        }
    }

    // expert_up on every kept slot: H = act(x·W1ᵀ + b1) (⊙ ...), magnitude from |x|·|W|.
    let abs_weights = absolute(&weights);
    let gated = if config.gated { 2.0 } else { 1.0 };
    let up_relative = (ACTIVATION_LIPSCHITZ * gated * 2.0 * (d_model as f64 + 2.0) + 16.0) * U
        + activation_relative(config.activation);
    let mut expert_outputs: Vec<Vec<f32>> = loads
        .kept
        .iter()
        .map(|&n| vec![0.0; n as usize * d_model])
        .collect();
    for (assignment, position) in positions.iter().enumerate() {
        let Some(position) = position else { continue };
        let expert = output.routes[assignment] as usize;
        let token = assignment / k;
        let slot = trace.assignment_slot[assignment] as usize;
        let x_row = &x[token * d_model..(token + 1) * d_model];
        let abs_row: Vec<f32> = x_row.iter().map(|v| v.abs()).collect();
        let expected = cpu_reference::expert_up(&[x_row], &weights, expert, config.hidden_unit());
        let magnitude = hidden_magnitude(config, &abs_row, &abs_weights, expert);
        let gpu_hidden = &trace.hidden[slot * d_ff..(slot + 1) * d_ff];
        assert_close(
            &format!("expert_up slot {slot}"),
            gpu_hidden,
            &expected,
            |f| up_relative * magnitude[f] as f64 + 1e-30,
        );

        // expert_down on the GPU's own hidden row.
        let expected = cpu_reference::expert_down(gpu_hidden, &weights, expert);
        let abs_hidden: Vec<f32> = gpu_hidden.iter().map(|v| v.abs()).collect();
        let magnitude = cpu_reference::expert_down(&abs_hidden, &abs_weights, expert);
        let gpu_out = &trace.expert_out[slot * d_model..(slot + 1) * d_model];
        let down_relative = (2.0 * (d_ff as f64 + 2.0)) * U;
        assert_close(
            &format!("expert_down slot {slot}"),
            gpu_out,
            &expected,
            |d| down_relative * magnitude[d] as f64 + 1e-30,
        );
        expert_outputs[expert][*position as usize * d_model..][..d_model].copy_from_slice(gpu_out);
    }

    // combine_outputs on the GPU's own expert outputs and gates: only k products and sums.
    let gpu_routing = Routing {
        logits: Vec::new(),
        probs: Vec::new(),
        logsumexp: Vec::new(),
        routes: output.routes.clone(),
        gates: output.gates.clone(),
        route_prob_max: output.route_prob_max.clone(),
    };
    let expected = cpu_reference::combine_outputs(
        &x,
        &gpu_routing,
        &positions,
        &expert_outputs,
        k,
        d_model,
        config,
    );
    assert_close("combine_outputs", &output.y, &expected, |i| {
        4.0 * k as f64 * U * (expected[i].abs() as f64 + x[i].abs() as f64) + 1e-30
    });
}

#[test]
fn kernels_match_their_cpu_twins() {
    traced_case(&config(1), 4, 16, 32, 100, 1);
    traced_case(
        &MoeConfig {
            capacity_factor: 0.6,
            ..config(2)
        },
        6,
        33,
        45,
        257,
        2,
    );
    let gated = MoeConfig {
        gated: true,
        activation: Activation::Gelu,
        group_size: Some(50),
        normalize_top_k: true,
        ..config(3)
    };
    traced_case(&gated, 8, 20, 28, 200, 3);
    // relu2 ungated, and swiglu_oai with a limit its pre-activations cross.
    let relu2 = MoeConfig {
        activation: Activation::Relu2,
        ..config(2)
    };
    traced_case(&relu2, 4, 20, 28, 100, 5);
    let swiglu_oai = MoeConfig {
        gated: true,
        activation: Activation::SwigluOai,
        swiglu_limit: 0.5,
        ..config(2)
    };
    traced_case(&swiglu_oai, 4, 20, 28, 100, 6);
    traced_case(
        &MoeConfig {
            expert_capacity: Some(3),
            ..config(2)
        },
        16,
        12,
        20,
        150,
        4,
    );
}
