//! The families' fixtures (tests/fixtures/families/<family>/, made by
//! make_family_fixtures.py from transformers 5.23's own MoE blocks in float64): DeepSeek-V3
//! and GLM-4.5 (sigmoid, score bias, groups, scaling, a shared expert), Qwen2-MoE (a gated
//! shared expert), Qwen3-MoE, OLMoE, gpt-oss (router bias, swiglu_oai, interleaved gate/up
//! with biases), ERNIE 4.5 (softmax with a score bias, a shared expert) and Llama 4 (top-k
//! sigmoid gates on the experts' input, a shared expert). The CPU reference must give their
//! output and every gradient, and so must the GPU (a shared expert trains there as the
//! experts it rides as).
//!
//! Tolerance: as tests/backward_fixtures.rs argues, f32 recomputation of the forward errs by
//! (D + F + N)·2⁻²⁴ relative to the magnitudes summed: per tensor |a − b| ≤ 1e-5·max|b| +
//! 1e-6 on the CPU; the GPU's f32 gradient sums over up to T·k rows add 8·(T·k)·2⁻²⁴.

mod common;

use std::path::PathBuf;

use common::gpu;
use switch_moe::cpu_backward::{backward, LossCoefficients};
use switch_moe::cpu_reference;
use switch_moe::tensor_io::{parse_safetensors, read_f32, F32Tensor};
use switch_moe::{Gradients, LayerOptions, MoeConfig, MoeLayer, MoeWeights, Naming};

const FAMILIES: [&str; 8] = [
    "deepseek_v3",
    "glm4_moe",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "gpt_oss",
    "ernie4_5_moe",
    "llama4_text",
];
const NO_LOSSES: LossCoefficients = LossCoefficients { aux: 0.0, z: 0.0 };

struct Fixture {
    name: &'static str,
    config: MoeConfig,
    weights: MoeWeights,
    x: F32Tensor,
    y: F32Tensor,
    grads: Vec<(String, F32Tensor)>,
}

fn path(name: &str, file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/families/{name}/{file}"))
}

fn tensors(name: &str, file: &str) -> Vec<(String, F32Tensor)> {
    let bytes = std::fs::read(path(name, file)).unwrap_or_else(|e| panic!("{name}/{file}: {e}"));
    let st = parse_safetensors(&bytes, file).unwrap();
    st.names()
        .into_iter()
        .map(|n| (n.to_string(), read_f32(&st.tensor(n).unwrap(), n).unwrap()))
        .collect()
}

fn load(name: &'static str) -> Fixture {
    let text = std::fs::read_to_string(path(name, "config.json")).unwrap();
    let config = MoeConfig::from_json_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let bytes = std::fs::read(path(name, "weights_native.safetensors")).unwrap();
    let weights = MoeWeights::from_safetensors_bytes(&bytes, Naming::Native, None, name)
        .unwrap_or_else(|e| panic!("{name}: weights: {e}"));
    let one = |file: &str, tensor: &str| {
        tensors(name, file)
            .into_iter()
            .find(|(n, _)| n == tensor)
            .unwrap_or_else(|| panic!("{name}/{file} has no {tensor}"))
            .1
    };
    Fixture {
        name,
        config,
        weights,
        x: one("input.safetensors", "x"),
        y: one("expected.safetensors", "y"),
        grads: tensors(name, "grads.safetensors"),
    }
}

fn check(what: &str, actual: &[f32], expected: &[f32], relative: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let largest = expected
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let tolerance = relative * largest + 1e-6;
    for (i, (&a, &b)) in actual.iter().zip(expected).enumerate() {
        let diff = (a as f64 - b as f64).abs();
        assert!(
            diff <= tolerance,
            "{what}[{i}]: {a} vs transformers' {b} (|diff| {diff:.2e} > {tolerance:.2e})"
        );
    }
}

/// Every gradient the fixture holds (all but dy) against ours, and ours has no others.
fn check_gradients(fixture: &Fixture, ours: &Gradients, relative: f64, device: &str) {
    let named = ours.named();
    let expected: Vec<&(String, F32Tensor)> =
        fixture.grads.iter().filter(|(n, _)| n != "dy").collect();
    let mut ours_names: Vec<&str> = named.iter().map(|(n, _)| *n).collect();
    let mut theirs: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    ours_names.sort_unstable();
    theirs.sort_unstable();
    assert_eq!(ours_names, theirs, "{}: gradient tensors", fixture.name);
    for (name, tensor) in expected {
        let values = named.iter().find(|(n, _)| n == name).unwrap().1;
        check(
            &format!("{} {device}: d{name}", fixture.name),
            values,
            &tensor.data,
            relative,
        );
    }
}

fn dy(fixture: &Fixture) -> &[f32] {
    &fixture
        .grads
        .iter()
        .find(|(n, _)| n == "dy")
        .unwrap()
        .1
        .data
}

#[test]
fn the_cpu_reference_gives_each_familys_output_and_gradients() {
    for name in FAMILIES {
        let f = load(name);
        let out = cpu_reference::forward(&f.config, &f.weights, &f.x.data, &f.x.shape)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        check(&format!("{name} cpu: y"), &out.y, &f.y.data, 1e-5);
        let grads = backward(
            &f.config,
            &f.weights,
            &f.x.data,
            &f.x.shape,
            dy(&f),
            NO_LOSSES,
        )
        .unwrap_or_else(|e| panic!("{name}: backward: {e}"));
        check_gradients(&f, &grads, 1e-5, "cpu");
    }
}

#[test]
fn the_gpu_gives_each_familys_output_and_gradients() {
    let context = gpu();
    for name in FAMILIES {
        let f = load(name);
        let rows = (f.x.shape[0] * f.config.top_k) as f64;
        let relative = 1e-5 + 8.0 * rows * f32::EPSILON as f64 / 2.0;
        let layer = MoeLayer::new(&context, f.config.clone(), &f.weights)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = layer.forward(&f.x.data, &f.x.shape).unwrap();
        check(&format!("{name} gpu: y"), &out.y, &f.y.data, relative);
        let options = LayerOptions {
            trainable: true,
            ..LayerOptions::default()
        };
        let layer = MoeLayer::with_options(&context, f.config.clone(), &f.weights, options)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = layer.forward_train(&f.x.data, &f.x.shape).unwrap();
        check(
            &format!("{name} gpu training: y"),
            &out.y,
            &f.y.data,
            relative,
        );
        let grads = layer.backward(dy(&f), NO_LOSSES).unwrap();
        check_gradients(&f, &grads, relative, "gpu");
    }
}

#[test]
fn the_blocks_own_state_dicts_load_as_the_native_weights() {
    // transformers 5.x's names: gate.weight, gate.e_score_correction_bias (ERNIE's in
    // gate.moe_statics), experts.gate_up_proj / down_proj, shared_experts.* or
    // shared_expert.* with shared_expert_gate.weight; gpt-oss's own router.weight/bias,
    // experts.gate_up_proj [N, D, 2F] interleaved and down_proj [N, F, D], with biases;
    // Llama 4's router.weight, gate_up_proj [N, D, 2F] in halves and shared_expert.*.
    for name in FAMILIES {
        let bytes = std::fs::read(path(name, "weights.safetensors")).unwrap();
        let theirs = MoeWeights::from_safetensors_bytes(&bytes, Naming::Auto, None, name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(theirs, load(name).weights, "{name}");
    }
}

/// The families' published checkpoints store one tensor per expert
/// (`experts.{i}.gate_proj|up_proj|down_proj.weight`) beside the 5.x router and shared
/// expert names: the blocks' state dicts rewritten so load as the same native weights.
#[test]
fn the_published_per_expert_layouts_load_as_the_native_weights() {
    use switch_moe::tensor_io::{serialize_tensors, OwnedTensor};
    for name in FAMILIES
        .into_iter()
        .filter(|&n| n != "gpt_oss" && n != "llama4_text")
    {
        let mut published = std::collections::BTreeMap::new();
        for (key, tensor) in tensors(name, "weights.safetensors") {
            let [n, rows, cols] = tensor.shape[..] else {
                published.insert(key, OwnedTensor::f32(tensor.shape.clone(), &tensor.data));
                continue;
            };
            let part = |i: usize, from: usize, to: usize| {
                let matrix = &tensor.data[i * rows * cols..(i + 1) * rows * cols];
                OwnedTensor::f32(vec![to - from, cols], &matrix[from * cols..to * cols])
            };
            for i in 0..n {
                if key == "experts.gate_up_proj" {
                    let f = rows / 2;
                    published.insert(format!("experts.{i}.gate_proj.weight"), part(i, 0, f));
                    published.insert(format!("experts.{i}.up_proj.weight"), part(i, f, rows));
                } else {
                    assert_eq!(key, "experts.down_proj", "{name}");
                    published.insert(format!("experts.{i}.down_proj.weight"), part(i, 0, rows));
                }
            }
        }
        let bytes = serialize_tensors(&published).unwrap();
        let loaded = MoeWeights::from_safetensors_bytes(&bytes, Naming::Auto, None, name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(loaded, load(name).weights, "{name}");
    }
}
