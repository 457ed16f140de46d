//! `--config` given a transformers model config.json: the layer's config derived for the
//! layer the prefix names, equal to the families' own configs (tests/fixtures/families);
//! dense layers, unknown and inexpressible families refused in one line; and the forward
//! tool run on a block's own state dict with its model config alone equals transformers.

use std::path::PathBuf;

use serde_json::{json, Value};
use switch_moe::forward_files::{load_layer, run_forward_files, Device, ForwardRequest};
use switch_moe::hf_config::config_from_transformers;
use switch_moe::tensor_io::{parse_safetensors, read_f32};
use switch_moe::{MoeConfig, MoeError};

fn family_file(name: &str, file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/families/{name}/{file}"))
}

fn transformers_config(name: &str) -> Value {
    let text = std::fs::read_to_string(family_file(name, "transformers_config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn refusal(model: &Value, prefix: Option<&str>) -> String {
    match config_from_transformers(model, prefix) {
        Err(MoeError::Config { key, message }) => {
            assert_eq!(key, "model_type");
            message
        }
        other => panic!("expected a model_type error, got {other:?}"),
    }
}

#[test]
fn each_familys_model_config_gives_its_layer_config() {
    // An MoE layer of each (DeepSeek-V3's first 3 are dense, GLM's first, ERNIE's first).
    for (name, layer) in [
        ("deepseek_v3", 3),
        ("glm4_moe", 1),
        ("qwen2_moe", 0),
        ("qwen3_moe", 0),
        ("olmoe", 0),
        ("gpt_oss", 0),
        ("ernie4_5_moe", 1),
        ("llama4_text", 0),
    ] {
        let prefix = format!("model.layers.{layer}.mlp.");
        let derived = config_from_transformers(&transformers_config(name), Some(&prefix))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = std::fs::read_to_string(family_file(name, "config.json")).unwrap();
        assert_eq!(derived, MoeConfig::from_json_str(&text).unwrap(), "{name}");
    }
}

#[test]
fn dense_layers_and_other_families_are_refused_in_one_line() {
    let deepseek = transformers_config("deepseek_v3");
    let message = refusal(&deepseek, Some("model.layers.2.mlp."));
    assert!(message.contains("layer 2 is a dense MLP"), "{message}");
    let mut qwen = transformers_config("qwen2_moe");
    qwen["mlp_only_layers"] = json!([0, 5]);
    assert!(refusal(&qwen, Some("model.layers.5.mlp.")).contains("dense"));
    qwen["decoder_sparse_step"] = json!(2);
    assert!(refusal(&qwen, Some("model.layers.2.mlp.")).contains("dense"));
    assert!(refusal(&json!({"model_type": "phimoe"}), None).contains("sparsemixer"));
    let mut llama4 = transformers_config("llama4_text");
    llama4["moe_layers"] = json!([1, 3]);
    assert!(refusal(&llama4, Some("model.layers.2.feed_forward.")).contains("dense"));
    let unknown = refusal(&json!({"model_type": "bert"}), None);
    assert!(
        unknown.contains("\"bert\"") && unknown.contains("deepseek_v3"),
        "{unknown}"
    );
    let mut odd = transformers_config("olmoe");
    odd["hidden_act"] = json!("mish");
    assert!(refusal(&odd, None).contains("mish"));
    odd.as_object_mut().unwrap().remove("num_experts");
    odd["hidden_act"] = json!("silu");
    assert!(refusal(&odd, None).contains("none of"));
}

#[test]
fn the_forward_tool_runs_a_blocks_state_dict_with_its_model_config() {
    let dir = std::env::temp_dir().join(format!("switch-moe-hf-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["deepseek_v3", "qwen2_moe", "ernie4_5_moe"] {
        let config = family_file(name, "transformers_config.json");
        let weights = family_file(name, "weights.safetensors");
        let (layer_config, _) = load_layer(&weights, Some(&config), None).unwrap();
        assert!(!layer_config.drop_tokens, "{name}: dropless");
        let output = dir.join(format!("{name}.safetensors"));
        let request = ForwardRequest {
            weights,
            input: family_file(name, "input.safetensors"),
            config: Some(config),
            output: output.clone(),
            prefix: None,
            device: Device::Cpu,
            gradients: None,
        };
        run_forward_files(&request).unwrap_or_else(|e| panic!("{name}: {e}"));
        let read = |path: PathBuf, tensor: &str| {
            let bytes = std::fs::read(path).unwrap();
            let st = parse_safetensors(&bytes, tensor).unwrap();
            read_f32(&st.tensor(tensor).unwrap(), tensor).unwrap().data
        };
        let y = read(output, "y");
        let expected = read(family_file(name, "expected.safetensors"), "y");
        let largest = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (a, b) in y.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-5 * largest + 1e-6, "{name}: {a} vs {b}");
        }
    }
}
