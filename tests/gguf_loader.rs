//! Loading an MoE layer from GGUF: llama.cpp's names mapped to the native ones, dims
//! innermost first, each tensor kept in its own stored format (the fixture's layers mix
//! Q4_K, Q8_0, Q6_K and F16, BF16, Q4_0), metadata as config defaults, a GPU forward of
//! the mixed formats against the CPU reference, and malformed layers giving errors that
//! name the file and the tensors.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use safetensors::SafeTensors;
use switch_moe::forward_files::load_layer;
use switch_moe::{Activation, MoeConfig, MoeError, MoeLayer, MoeWeights, WeightFormat};

fn fixture(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(file)
}

#[test]
fn both_layers_load_in_their_stored_formats() {
    let expected_bytes = std::fs::read(fixture("moe_layer_expected.safetensors")).unwrap();
    let expected = SafeTensors::deserialize(&expected_bytes).unwrap();
    let layers = [
        (
            "blk.0.",
            256,
            [WeightFormat::Q4K, WeightFormat::Q8_0, WeightFormat::Q6K],
        ),
        (
            "blk.1.",
            32,
            [WeightFormat::F16, WeightFormat::Bf16, WeightFormat::Q4_0],
        ),
    ];
    for (prefix, d_ff, [gate, up, down]) in layers {
        let (weights, info) =
            MoeWeights::from_gguf(fixture("moe_layer.gguf"), Some(prefix)).unwrap();
        assert_eq!(info.prefix, prefix);
        assert_eq!(info.architecture.as_deref(), Some("llama"));
        assert_eq!(
            (info.expert_count, info.expert_used_count),
            (Some(4), Some(2))
        );
        assert_eq!(weights.shape, shape(4, 256, d_ff));
        let w3 = weights.w3.as_ref().expect("gated: ffn_up_exps is w3");
        assert_eq!(
            [weights.w1.format, w3.format, weights.w2.format],
            [gate, up, down]
        );
        // Rows 0 and last of experts 0 and 3 decode to gguf-py's values, bit for bit.
        for (key, matrices) in [
            ("ffn_gate_exps.weight", &weights.w1),
            ("ffn_up_exps.weight", w3),
            ("ffn_down_exps.weight", &weights.w2),
        ] {
            for expert in [0, 3] {
                let decoded = matrices.matrix_f32(expert);
                for row in [0, matrices.rows - 1] {
                    let name = format!("{prefix}{key}.e{expert}.r{row}");
                    let view = expected
                        .tensor(&name)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    let want: Vec<u32> = view
                        .data()
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    let got: Vec<u32> = decoded[row * matrices.cols..(row + 1) * matrices.cols]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    assert_eq!(got, want, "{name}");
                }
            }
        }
        let router = expected
            .tensor(&format!("{prefix}ffn_gate_inp.weight"))
            .unwrap();
        let router: Vec<f32> = router
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(weights.router_weight, router);
    }
}

#[test]
fn a_file_of_two_layers_needs_the_prefix() {
    let message = MoeWeights::from_gguf(fixture("moe_layer.gguf"), None)
        .unwrap_err()
        .to_string();
    assert!(message.contains("moe_layer.gguf"), "{message}");
    assert!(
        message.contains("blk.0.") && message.contains("blk.1."),
        "{message}"
    );
    let message = MoeWeights::from_gguf(fixture("moe_layer.gguf"), Some("blk.7."))
        .unwrap_err()
        .to_string();
    assert!(message.contains("blk.7.ffn_gate_inp.weight"), "{message}");
}

#[test]
fn mixed_formats_on_the_gpu_match_the_reference() {
    for prefix in ["blk.0.", "blk.1."] {
        let (weights, info) =
            MoeWeights::from_gguf(fixture("moe_layer.gguf"), Some(prefix)).unwrap();
        // Mixtral's experts: SiLU-gated, top-k from the metadata, renormalised, dropless.
        let config = MoeConfig {
            top_k: info.expert_used_count.unwrap(),
            gated: true,
            activation: Activation::Silu,
            normalize_top_k: true,
            drop_tokens: false,
            ..MoeConfig::default()
        };
        let x = tokens(29, 256, 9);
        let layer = MoeLayer::new(&gpu(), config.clone(), &weights).unwrap();
        assert_eq!(
            layer.weight_formats(),
            [
                weights.w1.format,
                weights.w3.as_ref().unwrap().format,
                weights.w2.format
            ]
        );
        let output = layer.forward(&x, &[29, 256]).unwrap();
        let reference = cpu_forward(&config, &weights, &x, &[29, 256]);
        assert_matches_reference(&config, &weights, &x, &output, &reference);
    }
}

#[test]
fn metadata_gives_experts_and_top_k_where_the_config_does_not() {
    let dir = std::env::temp_dir().join(format!("switch-moe-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("config.json");
    std::fs::write(
        &config_path,
        r#"{"top_k": null, "gated": true, "activation": "silu"}"#,
    )
    .unwrap();
    let (config, weights) = load_layer(
        &fixture("moe_layer.gguf"),
        Some(&config_path),
        Some("blk.1."),
    )
    .unwrap();
    assert_eq!((config.n_experts, config.top_k), (Some(4), 2));
    assert_eq!(weights.shape.d_ff, 32);
    std::fs::write(
        &config_path,
        r#"{"top_k": 1, "gated": true, "naming": "labml"}"#,
    )
    .unwrap();
    let error = load_layer(
        &fixture("moe_layer.gguf"),
        Some(&config_path),
        Some("blk.1."),
    )
    .unwrap_err();
    assert!(matches!(error, MoeError::Naming { .. }), "{error}");
    std::fs::write(&config_path, r#"{"top_k": 1, "gated": true}"#).unwrap();
    let (config, _) = load_layer(
        &fixture("moe_layer.gguf"),
        Some(&config_path),
        Some("blk.0."),
    )
    .unwrap();
    assert_eq!(config.top_k, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A minimal GGUF writer: `llama` metadata and tensors given as (name, dims innermost
/// first, ggml type, bytes).
fn gguf_bytes(expert_count: u32, tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend(2u64.to_le_bytes());
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "llama");
    string(&mut out, "llama.expert_count");
    out.extend(4u32.to_le_bytes());
    out.extend(expert_count.to_le_bytes());
    let mut offset = 0u64;
    for (name, dims, type_id, data) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(type_id.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (data.len() as u64).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    for (_, _, _, data) in tensors {
        out.extend(data);
        out.resize(out.len().next_multiple_of(32), 0);
    }
    out
}

/// A non-gated layer: N = 2, D = 32, F = 64, router f32 with rows of `gate_inp_d`, experts
/// Q8_0 but the down projection, `down` (its ggml type and bytes).
fn layer_tensors(
    gate_inp_d: u64,
    down: (u32, Vec<u8>),
) -> Vec<(&'static str, Vec<u64>, u32, Vec<u8>)> {
    let weights = MoeWeights::random(shape(2, 32, 64), false, false, 3)
        .converted(WeightFormat::Q8_0)
        .unwrap();
    let router: Vec<u8> = (0..2 * gate_inp_d)
        .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
        .collect();
    vec![
        ("blk.0.ffn_gate_inp.weight", vec![gate_inp_d, 2], 0, router),
        (
            "blk.0.ffn_up_exps.weight",
            vec![32, 64, 2],
            8,
            weights.w1.stored_vec(),
        ),
        (
            "blk.0.ffn_down_exps.weight",
            vec![64, 32, 2],
            down.0,
            down.1,
        ),
    ]
}

fn q8_down() -> (u32, Vec<u8>) {
    let weights = MoeWeights::random(shape(2, 32, 64), false, false, 3)
        .converted(WeightFormat::Q8_0)
        .unwrap();
    (8, weights.w2.stored_vec())
}

fn load_error(bytes: &[u8]) -> String {
    match MoeWeights::from_gguf_bytes(bytes, None, "bad.gguf") {
        Ok(_) => panic!("expected an error"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn malformed_layers_name_the_file_and_tensors() {
    let good = gguf_bytes(2, &layer_tensors(32, q8_down()));
    let (weights, info) = MoeWeights::from_gguf_bytes(&good, None, "good.gguf").unwrap();
    assert_eq!(info.prefix, "blk.0.");
    assert!(
        weights.w3.is_none(),
        "ffn_up_exps without ffn_gate_exps is w1"
    );
    assert_eq!(weights.w2.format, WeightFormat::Q8_0);

    // An unsupported type: Q4_1 (id 3, 20 bytes per 32 values) for the down projection.
    let q4_1 = (3, vec![0u8; 2 * 32 * 2 * 20]);
    let message = load_error(&gguf_bytes(2, &layer_tensors(32, q4_1)));
    for part in ["bad.gguf", "blk.0.ffn_down_exps.weight", "Q4_1"] {
        assert!(message.contains(part), "{part}: {message}");
    }
    // The router says D = 16, the experts 32: both named.
    let message = load_error(&gguf_bytes(2, &layer_tensors(16, q8_down())));
    for part in [
        "bad.gguf",
        "blk.0.ffn_up_exps.weight",
        "blk.0.ffn_gate_inp.weight",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    // A non-finite Q8_0 scale (f16 infinity in block 3).
    let (id, mut bytes) = q8_down();
    bytes[3 * 34..3 * 34 + 2].copy_from_slice(&0x7c00u16.to_le_bytes());
    let message = load_error(&gguf_bytes(2, &layer_tensors(32, (id, bytes))));
    for part in ["bad.gguf", "blk.0.ffn_down_exps.weight", "non-finite scale"] {
        assert!(message.contains(part), "{part}: {message}");
    }
    // Metadata that disagrees with the tensors.
    let message = load_error(&gguf_bytes(8, &layer_tensors(32, q8_down())));
    assert!(
        message.contains("llama.expert_count") && message.contains("bad.gguf"),
        "{message}"
    );
    // A missing down projection.
    let mut tensors = layer_tensors(32, q8_down());
    tensors.pop();
    let message = load_error(&gguf_bytes(2, &tensors));
    assert!(
        message.contains("blk.0.ffn_down_exps.weight") && message.contains("missing"),
        "{message}"
    );
    // Truncated anywhere: an error, never a panic.
    for end in (0..good.len()).step_by(97) {
        assert!(MoeWeights::from_gguf_bytes(&good[..end], None, "cut.gguf").is_err());
    }
}
