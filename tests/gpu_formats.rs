//! Expert weights in every stored format on the GPU against the CPU reference, which decodes
//! them the same way: so the f32 bounds of the forward hold unchanged (the decoded values
//! are bit-identical on both sides; only the accumulation order differs). Awkward shapes,
//! gating, top-k, all tokens to one expert, heavy dropping, split weight shards, chunked
//! batches; quantizing on upload; the device bytes of each format.

mod common;

use common::*;
use switch_moe::{
    Activation, LayerOptions, MoeConfig, MoeError, MoeLayer, MoeWeights, WeightFormat,
};

/// The smallest row length each format can hold, and a second one to vary shapes.
fn row_lengths(format: WeightFormat) -> (usize, usize) {
    match format.block_values() {
        1 => (37, 45),
        32 => (64, 96),
        _ => (256, 512),
    }
}

/// Seeded weights in `format` (quantized from f32 on the host), run on the GPU with
/// `options` and on the CPU, compared; returns the GPU layer's weight bytes.
fn check_format(
    format: WeightFormat,
    config: MoeConfig,
    weights: &MoeWeights,
    num_tokens: usize,
    seed: u64,
    options: LayerOptions,
) -> u64 {
    let stored = weights.converted(format).expect("convert");
    assert_eq!(stored.w1.format, format);
    let d_model = weights.shape.d_model;
    let x = tokens(num_tokens, d_model, seed);
    let shape = [num_tokens, d_model];
    let layer = MoeLayer::with_options(&gpu(), config.clone(), &stored, options).expect("layer");
    assert_eq!(layer.weight_formats(), [format; 3]);
    let gpu_output = layer.forward(&x, &shape).expect("GPU forward");
    let cpu_output = cpu_forward(&config, &stored, &x, &shape);
    assert_matches_reference(&config, &stored, &x, &gpu_output, &cpu_output);
    layer.weight_bytes()
}

fn random(num_experts: usize, d_model: usize, d_ff: usize, gated: bool, seed: u64) -> MoeWeights {
    MoeWeights::random(shape(num_experts, d_model, d_ff), gated, true, seed)
}

#[test]
fn every_format_top1_and_top2() {
    for (i, format) in WeightFormat::ALL.into_iter().enumerate() {
        let (d_model, d_ff) = row_lengths(format);
        let seed = 100 + i as u64;
        let weights = random(5, d_model, d_ff, false, seed);
        check_format(
            format,
            config(1),
            &weights,
            57,
            seed,
            LayerOptions::default(),
        );
        let weights = random(3, d_ff, d_model, false, seed);
        check_format(
            format,
            config(2),
            &weights,
            23,
            seed,
            LayerOptions::default(),
        );
    }
}

#[test]
fn every_format_gated_one_token_one_expert() {
    // On GL the gated layers of every third format (see common::on_gl).
    let gl = on_gl();
    for (i, format) in WeightFormat::ALL.into_iter().enumerate() {
        let (d_model, d_ff) = row_lengths(format);
        let seed = 200 + i as u64;
        if !gl || i % 3 == 0 {
            let gated = MoeConfig {
                gated: true,
                activation: Activation::Silu,
                top_k: 2,
                normalize_top_k: true,
                ..MoeConfig::default()
            };
            let weights = random(4, d_model, d_ff, true, seed);
            let options = LayerOptions::default();
            check_format(format, gated.clone(), &weights, 1, seed, options.clone());
            check_format(format, gated, &weights, 30, seed, options);
        }
        let weights = random(1, d_model, d_ff, false, seed);
        check_format(
            format,
            config(1),
            &weights,
            19,
            seed,
            LayerOptions::default(),
        );
    }
}

#[test]
fn every_format_all_to_one_expert_and_heavy_dropping() {
    for (i, format) in WeightFormat::ALL.into_iter().enumerate() {
        let (d_model, d_ff) = row_lengths(format);
        let seed = 300 + i as u64;
        let mut weights = random(6, d_model, d_ff, false, seed);
        weights.router_bias.as_mut().unwrap()[4] = 50.0;
        check_format(
            format,
            config(1),
            &weights,
            40,
            seed,
            LayerOptions::default(),
        );
        let dropping = MoeConfig {
            capacity_factor: 0.3,
            ..config(2)
        };
        let weights = random(6, d_model, d_ff, false, seed);
        check_format(
            format,
            dropping,
            &weights,
            50,
            seed,
            LayerOptions::default(),
        );
    }
}

#[test]
fn every_format_in_split_shards_and_chunks() {
    for (i, format) in WeightFormat::ALL.into_iter().enumerate() {
        let (d_model, d_ff) = row_lengths(format);
        let seed = 400 + i as u64;
        let weights = random(5, d_model, d_ff, false, seed);
        let split = LayerOptions {
            max_experts_per_shard: Some(2),
            ..Default::default()
        };
        check_format(format, config(2), &weights, 33, seed, split);
        // Activation bindings capped at a quarter of the batch's x: four chunks or more.
        let chunked = LayerOptions {
            max_activation_binding_bytes: Some((64 * d_model * 4 / 4) as u64),
            ..Default::default()
        };
        let no_drop = MoeConfig {
            drop_tokens: false,
            ..config(1)
        };
        check_format(format, no_drop, &weights, 64, seed, chunked);
    }
}

#[test]
fn every_tiling_decodes_every_format() {
    // Forced tile shapes: the decoders sit in every variant's K loop.
    let formats = [WeightFormat::Bf16, WeightFormat::Q4_0, WeightFormat::Q6K];
    let tilings = [(8, 4, 1), (16, 16, 2), (16, 8, 8)];
    // On GL each format in one tiling, each tiling once (see common::on_gl).
    let gl = on_gl();
    for (i, format) in formats.into_iter().enumerate() {
        let (d_model, d_ff) = row_lengths(format);
        let weights = random(3, d_model, d_ff, false, 500 + i as u64);
        for (j, &(block, block_rows, row_lanes)) in tilings.iter().enumerate() {
            if gl && j != i {
                continue;
            }
            let options = LayerOptions {
                matmul_block: Some(block),
                block_rows: Some(block_rows),
                row_lanes: Some(row_lanes),
                ..Default::default()
            };
            check_format(format, config(1), &weights, 45, 500 + i as u64, options);
        }
    }
}

#[test]
fn quantizing_on_upload_equals_quantized_weights_and_reruns_are_identical() {
    let weights = random(4, 256, 256, true, 600);
    let gated = MoeConfig {
        gated: true,
        ..config(2)
    };
    let x = tokens(40, 256, 600);
    // On GL the K-quant only (see common::on_gl).
    let formats: &[WeightFormat] = if on_gl() {
        &[WeightFormat::Q4K]
    } else {
        &[WeightFormat::Q8_0, WeightFormat::Q4K]
    };
    for &format in formats {
        let on_upload = LayerOptions {
            weight_format: Some(format),
            ..Default::default()
        };
        let uploaded = MoeLayer::with_options(&gpu(), gated.clone(), &weights, on_upload).unwrap();
        let stored = weights.converted(format).unwrap();
        let prequantized = MoeLayer::new(&gpu(), gated.clone(), &stored).unwrap();
        let a = uploaded.forward(&x, &[40, 256]).unwrap();
        let b = prequantized.forward(&x, &[40, 256]).unwrap();
        let c = prequantized.forward(&x, &[40, 256]).unwrap();
        assert_eq!(a, b, "{format}: quantized on upload vs before");
        assert_eq!(b, c, "{format}: rerun");
    }
}

#[test]
fn weight_bytes_are_the_stored_size() {
    // Rows of 1024 values, 8 experts: the router and biases are under 1% of f32's bytes.
    let weights = random(8, 1024, 1024, false, 700);
    let bytes = |format| {
        let options = LayerOptions {
            weight_format: Some(format),
            ..Default::default()
        };
        let layer = MoeLayer::with_options(&gpu(), config(1), &weights, options).unwrap();
        layer.weight_bytes() as f64
    };
    let f32_bytes = bytes(WeightFormat::F32);
    let matrices = 2.0 * 8.0 * 1024.0 * 1024.0;
    assert!(f32_bytes >= 4.0 * matrices && f32_bytes < 4.01 * matrices);
    // Bits per weight as stored, and the layouts' few percent (expert_matmul.wgsl).
    for (format, bits, padding) in [
        (WeightFormat::F16, 16.0, 1.0),
        (WeightFormat::Bf16, 16.0, 1.0),
        (WeightFormat::Q8_0, 8.5, 1.0),
        (WeightFormat::Q4_0, 4.5, 1.0),
        (WeightFormat::Q4K, 4.5, 148.0 / 144.0),
        (WeightFormat::Q6K, 6.5625, 212.0 / 210.0),
        (WeightFormat::Mxfp4, 4.25, 1.0),
    ] {
        let expected = matrices * bits / 8.0 * padding;
        let measured = bytes(format);
        assert!(
            measured >= expected && measured < expected * 1.01 + 0.01 * f32_bytes,
            "{format}: {measured} bytes, expected about {expected}"
        );
    }
    assert!(f32_bytes / bytes(WeightFormat::Q4K) > 6.0);
}

#[test]
fn quantized_weights_do_not_convert_and_rows_must_be_whole_blocks() {
    let weights = random(2, 64, 96, false, 800);
    let q8 = weights.converted(WeightFormat::Q8_0).unwrap();
    match q8.converted(WeightFormat::Q4_0) {
        Err(MoeError::Tensor { name, message }) => {
            assert_eq!(name, "experts.w1");
            assert!(message.contains("q8_0"), "{message}");
        }
        other => panic!("expected a tensor error, got {other:?}"),
    }
    // 64-value rows are not whole Q4_K blocks of 256.
    match weights.converted(WeightFormat::Q4K) {
        Err(MoeError::Tensor { name, message }) => {
            assert_eq!(name, "experts.w1");
            assert!(message.contains("256"), "{message}");
        }
        other => panic!("expected a tensor error, got {other:?}"),
    }
}

/// gpt-oss's published MXFP4 experts (tests/fixtures/gpt_oss_mxfp4, made by
/// make_gpt_oss_mxfp4_fixture.py): loaded as stored, they decode to exactly what
/// transformers' own dequantization gives, and the GPU runs them as the CPU reference does.
#[test]
fn gpt_oss_checkpoint_mxfp4_experts_load_as_transformers_dequantizes_them_and_run() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt_oss_mxfp4");
    let load = |file: &str| {
        MoeWeights::from_safetensors(dir.join(file), switch_moe::Naming::Auto, None)
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let packed = load("weights.safetensors");
    let dequantized = load("dequantized.safetensors");
    for (name, ours, theirs) in [
        ("w1", &packed.w1, &dequantized.w1),
        ("w2", &packed.w2, &dequantized.w2),
        (
            "w3",
            packed.w3.as_ref().unwrap(),
            dequantized.w3.as_ref().unwrap(),
        ),
    ] {
        assert_eq!(ours.format, WeightFormat::Mxfp4, "{name}");
        assert_eq!(
            ours.to_f32(),
            theirs.to_f32(),
            "{name}: decoded vs transformers'"
        );
    }
    assert_eq!((&packed.b1, &packed.b3), (&dequantized.b1, &dequantized.b3));
    assert_eq!(
        (&packed.b2, &packed.router_bias),
        (&dequantized.b2, &dequantized.router_bias)
    );
    let config = MoeConfig {
        top_k: 2,
        drop_tokens: false,
        gated: true,
        normalize_top_k: true,
        activation: Activation::SwigluOai,
        ..MoeConfig::default()
    };
    let (num_tokens, d) = (13, packed.shape.d_model);
    let x = tokens(num_tokens, d, 5);
    let layer = MoeLayer::new(&gpu(), config.clone(), &packed).expect("layer");
    assert_eq!(layer.weight_formats(), [WeightFormat::Mxfp4; 3]);
    let gpu_output = layer.forward(&x, &[num_tokens, d]).expect("GPU forward");
    let cpu_output = cpu_forward(&config, &packed, &x, &[num_tokens, d]);
    assert_matches_reference(&config, &packed, &x, &gpu_output, &cpu_output);
}
