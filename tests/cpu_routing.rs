//! The CPU reference router's variants by hand (SPEC "The families people run"): sigmoid
//! scores, the score bias that chooses but never weighs, group-limited top-k with either
//! group score, excluded experts never chosen (even over negative selection scores), the
//! routed scaling factor after normalisation, and the config's checks of them.

mod common;

use common::*;
use switch_moe::cpu_reference::route_tokens;
use switch_moe::{
    ExpertGroups, ExpertMatrices, GroupScore, MoeConfig, MoeError, MoeWeights, Router, RouterScore,
};

/// Four experts over D = 4 with the identity as router: the logits are x itself.
fn identity_router(score_bias: [f32; 4]) -> MoeWeights {
    let mut router = vec![0.0f32; 16];
    for e in 0..4 {
        router[e * 4 + e] = 1.0;
    }
    MoeWeights {
        shape: shape(4, 4, 1),
        router_weight: router,
        router_bias: None,
        score_bias: Some(score_bias.to_vec()),
        w1: ExpertMatrices::from_f32(4, 1, 4, vec![0.0; 16]),
        b1: None,
        w2: ExpertMatrices::from_f32(4, 4, 1, vec![0.0; 16]),
        b2: None,
        w3: None,
        b3: None,
        shared: None,
    }
}

fn sigmoid(h: f32) -> f32 {
    (1.0 / (1.0 + (-(h as f64)).exp())) as f32
}

fn sigmoid_router(top_k: usize, groups: Option<(usize, usize, GroupScore)>) -> Router {
    Router {
        top_k,
        normalize_top_k: true,
        score: RouterScore::Sigmoid,
        groups: groups.map(|(count, kept, score)| ExpertGroups { count, kept, score }),
        routed_scaling_factor: 2.5,
    }
}

const LOGITS: [f32; 4] = [0.0, 2.0, 1.0, -1.0];

#[test]
fn the_score_bias_chooses_and_the_unbiased_scores_weigh() {
    // p = σ(h) = [0.5, 0.881, 0.731, 0.269]; p + bias = [1.1, 0.381, 0.731, 0.269].
    let weights = identity_router([0.6, -0.5, 0.0, 0.0]);
    let routing = route_tokens(&LOGITS, &weights, sigmoid_router(2, None));
    let p: Vec<f32> = LOGITS.iter().map(|&h| sigmoid(h)).collect();
    assert_eq!(routing.probs, p);
    assert_eq!(routing.routes, [0, 2]);
    let total = p[0] + p[2];
    assert_eq!(routing.gates, [p[0] / total * 2.5, p[2] / total * 2.5]);
    assert_eq!(routing.route_prob_max, [p[0]]);
    // The z-loss's logsumexp is the logits', whatever the scores.
    let lse = LOGITS.iter().map(|&h| (h as f64).exp()).sum::<f64>().ln();
    assert!((routing.logsumexp[0] as f64 - lse).abs() < 1e-6);
}

#[test]
fn group_limited_top_k_keeps_the_best_groups() {
    // Selection scores s = [1.4, -0.5, 0.8, 0.7] (p + bias): group 0 = {0, 1}, group 1 =
    // {2, 3}. Top-2 sums: 0.9 and 1.5, so group 1 stays; maxima: 1.4 and 0.8, group 0.
    let p: Vec<f32> = LOGITS.iter().map(|&h| sigmoid(h)).collect();
    let wanted = [1.4f32, -0.5, 0.8, 0.7];
    let bias: Vec<f32> = wanted.iter().zip(&p).map(|(s, p)| s - p).collect();
    let weights = identity_router(bias.clone().try_into().unwrap());
    let top2 = route_tokens(
        &LOGITS,
        &weights,
        sigmoid_router(2, Some((2, 1, GroupScore::Top2Sum))),
    );
    assert_eq!(top2.routes, [2, 3]);
    let by_max = route_tokens(
        &LOGITS,
        &weights,
        sigmoid_router(2, Some((2, 1, GroupScore::Max))),
    );
    // Group 0's only other expert has a negative selection score: it is still chosen over
    // group 1's excluded experts (transformers fills excluded scores with 0 and would
    // choose expert 2 here; SPEC says exclude).
    assert_eq!(by_max.routes, [0, 1]);
    let total = p[0] + p[1];
    assert_eq!(by_max.gates, [p[0] / total * 2.5, p[1] / total * 2.5]);
    // Both groups kept: plain top-k of the selection scores.
    let all = route_tokens(
        &LOGITS,
        &weights,
        sigmoid_router(2, Some((2, 2, GroupScore::Top2Sum))),
    );
    assert_eq!(all.routes, [0, 2]);
}

#[test]
fn ties_go_to_the_lower_group_and_expert() {
    // Equal logits and no bias: every score equal; group 0 and experts 0, 1 win.
    let weights = identity_router([0.0; 4]);
    let routing = route_tokens(
        &[0.5; 4],
        &weights,
        sigmoid_router(2, Some((2, 1, GroupScore::Top2Sum))),
    );
    assert_eq!(routing.routes, [0, 1]);
    let routing = route_tokens(&[0.5; 4], &weights, sigmoid_router(3, None));
    assert_eq!(routing.routes, [0, 1, 2]);
}

#[test]
fn softmax_with_a_score_bias_and_unnormalised_scaled_gates() {
    // ERNIE 4.5: softmax scores, selection on p + bias.
    let weights = identity_router([0.0, -0.5, 0.3, 0.0]);
    let router = Router {
        normalize_top_k: false,
        routed_scaling_factor: 2.0,
        ..Router::softmax(1, false)
    };
    let routing = route_tokens(&LOGITS, &weights, router);
    // p = softmax = [0.087, 0.644, 0.237, 0.032]; p + bias = [0.087, 0.144, 0.537, 0.032].
    assert_eq!(routing.routes, [2]);
    assert_eq!(routing.gates, [routing.probs[2] * 2.0]);
}

fn config_error(json: &str, n: usize) -> (String, String) {
    let result = MoeConfig::from_json_str(json).and_then(|c| c.validate_for_experts(n).map(|_| c));
    match result {
        Err(MoeError::Config { key, message }) => (key, message),
        other => panic!("{json}: expected a config error, got {other:?}"),
    }
}

#[test]
fn the_config_checks_groups_and_scaling() {
    let cases = [
        (r#"{"n_group": 3}"#, 8, "n_group", "does not divide"),
        (r#"{"n_group": 0}"#, 8, "n_group", "1 to 32"),
        (r#"{"n_group": 64}"#, 256, "n_group", "1 to 32"),
        (r#"{"topk_group": 2}"#, 8, "topk_group", "needs n_group"),
        (
            r#"{"n_group": 4, "topk_group": 5}"#,
            8,
            "topk_group",
            "1 to n_group",
        ),
        (r#"{"n_group": 8}"#, 8, "group_score", "2 experts per group"),
        (
            r#"{"n_group": 4, "topk_group": 1, "top_k": 3}"#,
            8,
            "top_k",
            "topk_group = 1",
        ),
        (
            r#"{"routed_scaling_factor": 0}"#,
            8,
            "routed_scaling_factor",
            "> 0",
        ),
        (
            r#"{"router_score": "tanh"}"#,
            8,
            "router_score",
            "unknown variant",
        ),
    ];
    for (json, n, key, words) in cases {
        let (got_key, message) = config_error(json, n);
        assert_eq!(got_key, key, "{json}: {message}");
        assert!(message.contains(words), "{json}: {message}");
    }
    // One expert per group is fine with the max score (DeepSeek-V2 style), and the
    // config round-trips through JSON.
    let config = MoeConfig::from_json_str(
        r#"{"n_group": 8, "topk_group": 3, "group_score": "max", "router_score": "sigmoid",
            "routed_scaling_factor": 2.5, "top_k": 2}"#,
    )
    .unwrap();
    config.validate_for_experts(8).unwrap();
    assert_eq!(
        MoeConfig::from_json_str(&config.to_json_string()).unwrap(),
        config
    );
    // The command-line names are the JSON's (the train example's --router and --gate-on).
    assert_eq!("sigmoid".parse(), Ok(switch_moe::RouterScore::Sigmoid));
    assert_eq!("input".parse(), Ok(switch_moe::GateOn::Input));
    let refused = "inputs".parse::<switch_moe::GateOn>().unwrap_err();
    assert!(refused.contains("\"inputs\""), "{refused}");
}
