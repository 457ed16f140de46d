//! GGUF files converted by llama.cpp's own convert_hf_to_gguf.py from tiny transformers
//! models (tests/fixtures/gguf_converted/<model_type>/, made by
//! make_converted_gguf_fixtures.sh): each loads with no config — the metadata gives the
//! family's routing, the tensors its shared expert, its gate and score bias — and the CPU
//! reference and the GPU give the output of transformers' own layer-0 MoE block in float64.
//! The config the metadata gives is the one transformers' config.json gives.
//!
//! Tolerance: as tests/family_fixtures.rs argues, f32 recomputation errs by
//! (D + F + N)·2⁻²⁴ relative to the magnitudes summed: |a − b| ≤ 1e-5·max|y| + 1e-6.

mod common;

use std::path::PathBuf;

use common::gpu;
use switch_moe::cpu_reference;
use switch_moe::forward_files::{load_layer, read_input};
use switch_moe::hf_config::config_from_transformers;
use switch_moe::tensor_io::{parse_safetensors, read_f32};
use switch_moe::MoeLayer;

const FAMILIES: [&str; 6] = [
    "deepseek_v3",
    "glm4_moe",
    "qwen2_moe",
    "qwen3_moe",
    "gpt_oss",
    "llama4_text",
];

fn path(family: &str, file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/gguf_converted/{family}/{file}"))
}

fn expected_y(family: &str) -> Vec<f32> {
    let bytes = std::fs::read(path(family, "expected.safetensors")).unwrap();
    let file = parse_safetensors(&bytes, family).unwrap();
    read_f32(&file.tensor("y").unwrap(), "y").unwrap().data
}

fn check(what: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let largest = expected
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let tolerance = 1e-5 * largest + 1e-6;
    for (i, (&a, &b)) in actual.iter().zip(expected).enumerate() {
        let diff = (a as f64 - b as f64).abs();
        assert!(
            diff <= tolerance,
            "{what}[{i}]: {a} vs transformers' {b} (|diff| {diff:.2e} > {tolerance:.2e})"
        );
    }
}

#[test]
fn each_converted_file_runs_as_transformers_ran_it_without_a_config() {
    let context = gpu();
    for family in FAMILIES {
        let (config, weights) = load_layer(&path(family, "model.gguf"), None, Some("blk.0."))
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let expects_shared = family != "qwen3_moe" && family != "gpt_oss";
        assert_eq!(
            weights.shared.is_some(),
            expects_shared,
            "{family}: shared expert"
        );
        let x = read_input(&path(family, "input.safetensors")).unwrap();
        let y = expected_y(family);
        let cpu = cpu_reference::forward(&config, &weights, &x.data, &x.shape)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        check(&format!("{family} cpu"), &cpu.y, &y);
        let layer =
            MoeLayer::new(&context, config, &weights).unwrap_or_else(|e| panic!("{family}: {e}"));
        let output = layer.forward(&x.data, &x.shape).unwrap();
        check(&format!("{family} gpu"), &output.y, &y);
    }
}

#[test]
fn the_metadata_gives_the_config_transformers_config_gives() {
    for family in FAMILIES {
        let (from_gguf, _) = load_layer(&path(family, "model.gguf"), None, Some("blk.0.")).unwrap();
        let text = std::fs::read_to_string(path(family, "transformers_config.json")).unwrap();
        let model: serde_json::Value = serde_json::from_str(&text).unwrap();
        let from_hf = config_from_transformers(&model, Some("model.layers.0.mlp."))
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        assert_eq!(from_gguf, from_hf, "{family}");
    }
}

#[test]
fn safetensors_without_a_config_is_a_clear_error() {
    let weights = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families/qwen3_moe/weights_native.safetensors");
    let error = load_layer(&weights, None, None).unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("weights_native.safetensors") && text.contains("--config"),
        "{text}"
    );
}

/// The metadata keys over a family's defaults: DeepSeek-V2's softmax groups by their best,
/// gpt-oss's softmax of the chosen logits, an unknown gating function named by its key, an
/// architecture outside the families kept plain.
#[test]
fn metadata_keys_override_the_familys_defaults() {
    use switch_moe::gguf_config::config_from_gguf;
    use switch_moe::weights::GgufLayerInfo;
    use switch_moe::{GroupScore, MoeError, MoeWeights, RouterScore};
    let weights = MoeWeights::random(common::shape(8, 16, 12), true, false, 3);
    let info = |arch: &str| GgufLayerInfo {
        prefix: "blk.0.".into(),
        architecture: Some(arch.into()),
        expert_count: Some(8),
        expert_used_count: Some(2),
        expert_group_count: None,
        expert_group_used_count: None,
        expert_gating_func: None,
        expert_weights_scale: None,
        expert_weights_norm: None,
    };
    let v2 = GgufLayerInfo {
        expert_group_count: Some(4),
        expert_group_used_count: Some(2),
        expert_weights_scale: Some(16.0),
        ..info("deepseek2")
    };
    let config = config_from_gguf(&v2, &weights).unwrap();
    assert_eq!(config.router_score, RouterScore::Softmax);
    assert_eq!((config.n_group, config.topk_group), (Some(4), Some(2)));
    assert_eq!(config.group_score, GroupScore::Max);
    assert_eq!(config.routed_scaling_factor, 16.0);
    assert!(!config.normalize_top_k && !config.drop_tokens && config.gated);
    let chosen = GgufLayerInfo {
        expert_gating_func: Some(3),
        expert_weights_norm: Some(false),
        ..info("qwen2moe")
    };
    assert!(config_from_gguf(&chosen, &weights).unwrap().normalize_top_k);
    let odd = GgufLayerInfo {
        expert_gating_func: Some(7),
        ..info("glm4moe")
    };
    let error = config_from_gguf(&odd, &weights).unwrap_err();
    assert!(
        matches!(&error, MoeError::Config { key, .. } if key == "glm4moe.expert_gating_func"),
        "{error}"
    );
    let plain = config_from_gguf(&info("granitemoe"), &weights).unwrap();
    assert_eq!((plain.n_experts, plain.top_k), (Some(8), 2));
    assert!(plain.drop_tokens && !plain.gated);
}
