//! Config parsing and weight loading: every naming, and every kind of bad input giving an
//! error that names the culprit.

use std::collections::BTreeMap;

use safetensors::SafeTensors;
use switch_moe::tensor_io::{serialize_tensors, OwnedTensor};
use switch_moe::{
    ExpertMatrices, LayerShape, MoeConfig, MoeError, MoeWeights, Naming, WeightFormat,
};

const SHAPE: LayerShape = LayerShape {
    num_experts: 3,
    d_model: 4,
    d_ff: 6,
};

fn config_error_key(text: &str) -> String {
    match MoeConfig::from_json_str(text) {
        Err(MoeError::Config { key, .. }) => key,
        other => panic!("{text}: expected a config error, got {other:?}"),
    }
}

#[test]
fn config_defaults_and_full_form() {
    assert_eq!(
        MoeConfig::from_json_str("{}").unwrap(),
        MoeConfig::default()
    );
    let full = r#"{"n_experts": 8, "top_k": 2, "capacity_factor": 2.0, "expert_capacity": 5,
        "group_size": 16, "drop_tokens": false, "drop_policy": "zero", "scale_by_prob": false,
        "activation": "gelu_tanh", "gated": true, "normalize_top_k": true, "naming": "hf_mixtral"}"#;
    let config = MoeConfig::from_json_str(full).unwrap();
    assert_eq!(config.n_experts, Some(8));
    assert_eq!(config.expert_capacity, Some(5));
    assert_eq!(config.naming, Naming::HfMixtral);
    assert!(config.gated && config.normalize_top_k && !config.drop_tokens);
}

#[test]
fn config_nulls_mean_defaults() {
    // What Python's json.dump writes for a dict with None in its unused keys.
    let text = r#"{"n_experts": 4, "top_k": 2, "capacity_factor": null, "expert_capacity": 3,
        "group_size": null, "drop_tokens": null, "drop_policy": null, "scale_by_prob": null,
        "activation": null, "gated": null, "normalize_top_k": null, "naming": null}"#;
    let config = MoeConfig::from_json_str(text).unwrap();
    let expected = MoeConfig {
        n_experts: Some(4),
        top_k: 2,
        expert_capacity: Some(3),
        ..MoeConfig::default()
    };
    assert_eq!(config, expected);
    let all_null = r#"{"n_experts": null, "top_k": null, "capacity_factor": null}"#;
    assert_eq!(
        MoeConfig::from_json_str(all_null).unwrap(),
        MoeConfig::default()
    );
}

#[test]
fn config_errors_name_the_key() {
    let cases = [
        (r#"{"bogus": 1}"#, "bogus"),
        (r#"{"top_k": 0}"#, "top_k"),
        (r#"{"top_k": -1}"#, "top_k"),
        (r#"{"top_k": "two"}"#, "top_k"),
        (r#"{"n_experts": 2, "top_k": 3}"#, "top_k"),
        (r#"{"n_experts": 0}"#, "n_experts"),
        (r#"{"capacity_factor": 0}"#, "capacity_factor"),
        (r#"{"capacity_factor": -1.5}"#, "capacity_factor"),
        (r#"{"expert_capacity": -3}"#, "expert_capacity"),
        (r#"{"group_size": 0}"#, "group_size"),
        (r#"{"drop_tokens": "yes"}"#, "drop_tokens"),
        (r#"{"drop_policy": "drop"}"#, "drop_policy"),
        (r#"{"scale_by_prob": 1}"#, "scale_by_prob"),
        (r#"{"activation": "tanh"}"#, "activation"),
        (r#"{"bogus": null}"#, "bogus"),
        (r#"{"normalize_top_k": []}"#, "normalize_top_k"),
        (r#"{"naming": "pytorch"}"#, "naming"),
        ("[1, 2]", "<json>"),
        ("{not json", "<json>"),
    ];
    for (text, key) in cases {
        assert_eq!(config_error_key(text), key, "{text}");
    }
    // A zero capacity factor is fine when nothing is dropped or a fixed capacity is given.
    assert!(MoeConfig::from_json_str(r#"{"capacity_factor": 0, "drop_tokens": false}"#).is_ok());
    assert!(MoeConfig::from_json_str(r#"{"capacity_factor": 0, "expert_capacity": 4}"#).is_ok());
}

#[test]
fn config_against_weights_and_input() {
    let config = MoeConfig::from_json_str(r#"{"n_experts": 4}"#).unwrap();
    assert!(
        matches!(config.validate_for_experts(3), Err(MoeError::Config { ref key, .. }) if key == "n_experts")
    );
    let config = MoeConfig::from_json_str(r#"{"top_k": 4}"#).unwrap();
    assert!(
        matches!(config.validate_for_experts(3), Err(MoeError::Config { ref key, .. }) if key == "top_k")
    );
    let config = MoeConfig::from_json_str(r#"{"group_size": 3}"#).unwrap();
    assert_eq!(config.group_size_for(9).unwrap(), 3);
    assert!(
        matches!(config.group_size_for(10), Err(MoeError::Config { ref key, .. }) if key == "group_size")
    );
}

/// The values of f32 expert matrices.
fn f32s(matrices: &ExpertMatrices) -> &[f32] {
    matrices.f32_values().expect("f32 weights")
}

fn random_weights(gated: bool, biases: bool) -> MoeWeights {
    MoeWeights::random(SHAPE, gated, biases, 7)
}

fn f32_tensor(shape: Vec<usize>, values: &[f32]) -> OwnedTensor {
    OwnedTensor::f32(shape, values)
}

/// Expert e's [rows, cols] matrix of a stacked tensor.
fn matrix(data: &[f32], expert: usize, rows: usize, cols: usize) -> Vec<f32> {
    data[expert * rows * cols..(expert + 1) * rows * cols].to_vec()
}

/// The weights under labml_nn's names.
fn labml_tensors(w: &MoeWeights) -> BTreeMap<String, OwnedTensor> {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = w.shape;
    let mut t = BTreeMap::new();
    t.insert(
        "switch.weight".into(),
        f32_tensor(vec![n, d], &w.router_weight),
    );
    t.insert(
        "switch.bias".into(),
        f32_tensor(vec![n], w.router_bias.as_ref().unwrap()),
    );
    for e in 0..n {
        t.insert(
            format!("experts.{e}.layer1.weight"),
            f32_tensor(vec![f, d], &matrix(f32s(&w.w1), e, f, d)),
        );
        t.insert(
            format!("experts.{e}.layer1.bias"),
            f32_tensor(vec![f], &matrix(w.b1.as_ref().unwrap(), e, f, 1)),
        );
        t.insert(
            format!("experts.{e}.layer2.weight"),
            f32_tensor(vec![d, f], &matrix(f32s(&w.w2), e, d, f)),
        );
        t.insert(
            format!("experts.{e}.layer2.bias"),
            f32_tensor(vec![d], &matrix(w.b2.as_ref().unwrap(), e, d, 1)),
        );
        if let Some(w3) = &w.w3 {
            t.insert(
                format!("experts.{e}.linear_v.weight"),
                f32_tensor(vec![f, d], &matrix(f32s(w3), e, f, d)),
            );
            t.insert(
                format!("experts.{e}.linear_v.bias"),
                f32_tensor(vec![f], &matrix(w.b3.as_ref().unwrap(), e, f, 1)),
            );
        }
    }
    t
}

fn hf_switch_tensors(w: &MoeWeights) -> BTreeMap<String, OwnedTensor> {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = w.shape;
    let mut t = BTreeMap::new();
    t.insert(
        "router.classifier.weight".into(),
        f32_tensor(vec![n, d], &w.router_weight),
    );
    for e in 0..n {
        t.insert(
            format!("experts.expert_{e}.wi.weight"),
            f32_tensor(vec![f, d], &matrix(f32s(&w.w1), e, f, d)),
        );
        t.insert(
            format!("experts.expert_{e}.wo.weight"),
            f32_tensor(vec![d, f], &matrix(f32s(&w.w2), e, d, f)),
        );
    }
    t
}

fn mixtral_per_expert_tensors(w: &MoeWeights) -> BTreeMap<String, OwnedTensor> {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = w.shape;
    let mut t = BTreeMap::new();
    t.insert(
        "gate.weight".into(),
        f32_tensor(vec![n, d], &w.router_weight),
    );
    for e in 0..n {
        t.insert(
            format!("experts.{e}.w1.weight"),
            f32_tensor(vec![f, d], &matrix(f32s(&w.w1), e, f, d)),
        );
        t.insert(
            format!("experts.{e}.w2.weight"),
            f32_tensor(vec![d, f], &matrix(f32s(&w.w2), e, d, f)),
        );
        t.insert(
            format!("experts.{e}.w3.weight"),
            f32_tensor(vec![f, d], &matrix(f32s(w.w3.as_ref().unwrap()), e, f, d)),
        );
    }
    t
}

fn mixtral_stacked_tensors(w: &MoeWeights) -> BTreeMap<String, OwnedTensor> {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = w.shape;
    let mut gate_up = Vec::new();
    for e in 0..n {
        gate_up.extend(matrix(f32s(&w.w1), e, f, d));
        gate_up.extend(matrix(f32s(w.w3.as_ref().unwrap()), e, f, d));
    }
    let mut t = BTreeMap::new();
    t.insert(
        "gate.weight".into(),
        f32_tensor(vec![n, d], &w.router_weight),
    );
    t.insert(
        "experts.gate_up_proj".into(),
        f32_tensor(vec![n, 2 * f, d], &gate_up),
    );
    t.insert(
        "experts.down_proj".into(),
        f32_tensor(vec![n, d, f], f32s(&w.w2)),
    );
    t
}

fn load(
    tensors: &BTreeMap<String, OwnedTensor>,
    naming: Naming,
    prefix: Option<&str>,
) -> Result<MoeWeights, MoeError> {
    let bytes = serialize_tensors(tensors).unwrap();
    MoeWeights::from_safetensors_bytes(&bytes, naming, prefix, "test.safetensors")
}

fn without_biases(mut w: MoeWeights) -> MoeWeights {
    w.router_bias = None;
    w.b1 = None;
    w.b2 = None;
    w.b3 = None;
    w
}

#[test]
fn every_naming_loads_to_the_same_weights() {
    for gated in [false, true] {
        let weights = random_weights(gated, true);
        let native = weights.to_safetensors_bytes().unwrap();
        let loaded =
            MoeWeights::from_safetensors_bytes(&native, Naming::Auto, None, "native").unwrap();
        assert_eq!(loaded, weights);
        assert_eq!(
            load(&labml_tensors(&weights), Naming::Auto, None).unwrap(),
            weights
        );
        assert_eq!(
            load(&labml_tensors(&weights), Naming::Labml, None).unwrap(),
            weights
        );
    }
    let plain = without_biases(random_weights(false, false));
    assert_eq!(
        load(&hf_switch_tensors(&plain), Naming::Auto, None).unwrap(),
        plain
    );
    let gated = without_biases(random_weights(true, false));
    assert_eq!(
        load(&mixtral_per_expert_tensors(&gated), Naming::Auto, None).unwrap(),
        gated
    );
    assert_eq!(
        load(&mixtral_stacked_tensors(&gated), Naming::HfMixtral, None).unwrap(),
        gated
    );
}

#[test]
fn prefix_selects_one_layer_of_a_model() {
    let weights = random_weights(false, true);
    let mut model = BTreeMap::new();
    for (name, tensor) in labml_tensors(&weights) {
        model.insert(format!("encoder.layers.1.ffn.{name}"), tensor);
    }
    model.insert(
        "encoder.embed.weight".into(),
        f32_tensor(vec![2, 2], &[1.0; 4]),
    );
    assert_eq!(
        load(&model, Naming::Auto, Some("encoder.layers.1.ffn.")).unwrap(),
        weights
    );
    // Without the prefix, the names match no naming.
    assert!(matches!(
        load(&model, Naming::Auto, None),
        Err(MoeError::Tensor { .. })
    ));
    assert!(matches!(
        load(&model, Naming::Auto, Some("decoder.")),
        Err(MoeError::Naming { .. })
    ));
}

/// The name of the tensor a loading error blames.
fn blamed_tensor(result: Result<MoeWeights, MoeError>) -> String {
    match result {
        Err(MoeError::Tensor { name, .. }) => name,
        other => panic!("expected a tensor error, got {other:?}"),
    }
}

#[test]
fn tensor_errors_name_the_tensor() {
    let weights = random_weights(false, true);
    let good = labml_tensors(&weights);

    let mut missing = good.clone();
    missing.remove("experts.1.layer2.weight");
    assert_eq!(
        blamed_tensor(load(&missing, Naming::Auto, None)),
        "experts.1.layer2.weight"
    );

    let mut partial_bias = good.clone();
    partial_bias.remove("experts.2.layer1.bias");
    assert_eq!(
        blamed_tensor(load(&partial_bias, Naming::Auto, None)),
        "experts.2.layer1.bias"
    );

    let mut transposed = good.clone();
    transposed.insert(
        "experts.0.layer1.weight".into(),
        f32_tensor(vec![4, 6], &matrix(f32s(&weights.w1), 0, 6, 4)),
    );
    assert_eq!(
        blamed_tensor(load(&transposed, Naming::Auto, None)),
        "experts.0.layer1.weight"
    );

    let mut wrong_shape = good.clone();
    wrong_shape.insert("switch.bias".into(), f32_tensor(vec![4], &[0.0; 4]));
    assert_eq!(
        blamed_tensor(load(&wrong_shape, Naming::Auto, None)),
        "switch.bias"
    );

    let mut wrong_dtype = good.clone();
    wrong_dtype.insert(
        "experts.1.layer2.bias".into(),
        OwnedTensor::i64(vec![4], [1, 2, 3, 4]),
    );
    assert_eq!(
        blamed_tensor(load(&wrong_dtype, Naming::Auto, None)),
        "experts.1.layer2.bias"
    );

    let mut extra_expert = good.clone();
    extra_expert.insert(
        "experts.3.layer1.weight".into(),
        f32_tensor(vec![6, 4], &[0.0; 24]),
    );
    assert_eq!(
        blamed_tensor(load(&extra_expert, Naming::Auto, None)),
        "experts.3.layer1.weight"
    );

    let mut unknown = good.clone();
    unknown.insert(
        "experts.0.layer3.weight".into(),
        f32_tensor(vec![1], &[0.0]),
    );
    assert_eq!(
        blamed_tensor(load(&unknown, Naming::Auto, None)),
        "experts.0.layer3.weight"
    );

    for bad in [f32::NAN, f32::INFINITY] {
        let mut non_finite = good.clone();
        let mut values = matrix(f32s(&weights.w2), 2, 4, 6);
        values[5] = bad;
        non_finite.insert(
            "experts.2.layer2.weight".into(),
            f32_tensor(vec![4, 6], &values),
        );
        assert_eq!(
            blamed_tensor(load(&non_finite, Naming::Auto, None)),
            "experts.2.layer2.weight"
        );
    }

    let mut no_router = good.clone();
    no_router.remove("switch.weight");
    no_router.remove("switch.bias");
    assert_eq!(
        blamed_tensor(load(&no_router, Naming::Auto, None)),
        "switch.weight"
    );
}

#[test]
fn naming_errors() {
    let weights = random_weights(false, true);
    let mut mixed = labml_tensors(&weights);
    mixed.insert(
        "router.weight".into(),
        f32_tensor(vec![3, 4], &weights.router_weight),
    );
    assert!(matches!(
        load(&mixed, Naming::Auto, None),
        Err(MoeError::Naming { .. })
    ));

    let gated = without_biases(random_weights(true, false));
    let mut both_mixtral_layouts = mixtral_per_expert_tensors(&gated);
    both_mixtral_layouts.extend(mixtral_stacked_tensors(&gated));
    assert!(matches!(
        load(&both_mixtral_layouts, Naming::Auto, None),
        Err(MoeError::Naming { .. })
    ));

    assert!(matches!(
        load(&labml_tensors(&weights), Naming::HfSwitch, None),
        Err(MoeError::Naming { .. })
    ));
    assert!(matches!(
        load(&BTreeMap::new(), Naming::Auto, None),
        Err(MoeError::Naming { .. })
    ));
}

#[test]
fn malformed_files_are_file_errors() {
    let bytes = random_weights(false, true).to_safetensors_bytes().unwrap();
    let mut oversized_header = bytes.clone();
    oversized_header[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let cases: [(&str, Vec<u8>); 5] = [
        ("empty", vec![]),
        ("truncated", bytes[..bytes.len() - 7].to_vec()),
        ("truncated header", bytes[..20].to_vec()),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        ("oversized header", oversized_header),
    ];
    for (what, data) in cases {
        match MoeWeights::from_safetensors_bytes(&data, Naming::Auto, None, what) {
            Err(MoeError::File { path, .. }) => assert_eq!(path.to_str(), Some(what)),
            other => panic!("{what}: expected a file error, got {other:?}"),
        }
    }
    match MoeWeights::from_safetensors("/nonexistent/weights.safetensors", Naming::Auto, None) {
        Err(MoeError::File { path, .. }) => assert!(path.ends_with("weights.safetensors")),
        other => panic!("expected a file error, got {other:?}"),
    }
}

/// The tensors of `tensors` with every expert matrix re-encoded in `format` (f16 or bf16).
fn half_precision(
    tensors: &BTreeMap<String, OwnedTensor>,
    weights: &MoeWeights,
    format: WeightFormat,
) -> (BTreeMap<String, OwnedTensor>, MoeWeights) {
    let converted = weights.converted(format).unwrap();
    let mut out = tensors.clone();
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = weights.shape;
    out.insert(
        "experts.w1".into(),
        OwnedTensor::stored("w1", vec![n, f, d], format, converted.w1.stored_vec()).unwrap(),
    );
    out.insert(
        "experts.w2".into(),
        OwnedTensor::stored("w2", vec![n, d, f], format, converted.w2.stored_vec()).unwrap(),
    );
    (out, converted)
}

#[test]
fn half_precision_experts_load_as_stored() {
    let weights = random_weights(false, true);
    let native = weights.to_safetensors_bytes().unwrap();
    let file = SafeTensors::deserialize(&native).unwrap();
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        tensors.insert(name, OwnedTensor::f32(view.shape().to_vec(), &read(&view)));
    }
    for format in [WeightFormat::F16, WeightFormat::Bf16] {
        let (half, expected) = half_precision(&tensors, &weights, format);
        let loaded = load(&half, Naming::Auto, None).unwrap();
        assert_eq!(loaded.w1.format, format);
        assert_eq!(loaded, expected);
        // Saved back in the native naming, in the same dtype.
        let again = MoeWeights::from_safetensors_bytes(
            &loaded.to_safetensors_bytes().unwrap(),
            Naming::Auto,
            None,
            "again",
        )
        .unwrap();
        assert_eq!(again, expected);
    }
    // labml's per-expert tensors in bf16 stack into one bf16 tensor.
    let bf16 = weights.converted(WeightFormat::Bf16).unwrap();
    let mut labml = labml_tensors(&weights);
    for e in 0..SHAPE.num_experts {
        let rows = |m: &ExpertMatrices| {
            let per = m.stored_vec().len() / m.count;
            m.stored_vec()[e * per..(e + 1) * per].to_vec()
        };
        let (f, d) = (SHAPE.d_ff, SHAPE.d_model);
        labml.insert(
            format!("experts.{e}.layer1.weight"),
            OwnedTensor::stored("w1", vec![f, d], WeightFormat::Bf16, rows(&bf16.w1)).unwrap(),
        );
        labml.insert(
            format!("experts.{e}.layer2.weight"),
            OwnedTensor::stored("w2", vec![d, f], WeightFormat::Bf16, rows(&bf16.w2)).unwrap(),
        );
    }
    assert_eq!(load(&labml, Naming::Auto, None).unwrap(), bf16);
    // One expert in f16 among bf16 ones: an error naming it.
    let f16 = weights.converted(WeightFormat::F16).unwrap();
    let per = f16.w1.stored_vec().len() / SHAPE.num_experts;
    labml.insert(
        "experts.1.layer1.weight".into(),
        OwnedTensor::stored(
            "w1",
            vec![SHAPE.d_ff, SHAPE.d_model],
            WeightFormat::F16,
            f16.w1.stored_vec()[per..2 * per].to_vec(),
        )
        .unwrap(),
    );
    assert_eq!(
        blamed_tensor(load(&labml, Naming::Auto, None)),
        "experts.1.layer1.weight"
    );
}

#[test]
fn disagreeing_dimensions_name_both_tensors() {
    let weights = random_weights(false, true);
    let mut tensors = labml_tensors(&weights);
    // The router says D = 5, the experts 4.
    tensors.insert(
        "switch.weight".into(),
        f32_tensor(vec![SHAPE.num_experts, 5], &[0.1; SHAPE.num_experts * 5]),
    );
    let message = load(&tensors, Naming::Auto, None).unwrap_err().to_string();
    assert!(
        message.contains("switch.weight") && message.contains("experts.0.layer1.weight"),
        "{message}"
    );
    let native = weights.to_safetensors_bytes().unwrap();
    let file = SafeTensors::deserialize(&native).unwrap();
    let mut tensors: BTreeMap<String, OwnedTensor> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, OwnedTensor::f32(view.shape().to_vec(), &read(&view))))
        .collect();
    tensors.insert(
        "experts.w2".into(),
        f32_tensor(
            vec![SHAPE.num_experts, 4, 7],
            &[0.1; SHAPE.num_experts * 28],
        ),
    );
    let message = load(&tensors, Naming::Auto, None).unwrap_err().to_string();
    for name in ["experts.w2", "router.weight", "experts.w1"] {
        assert!(message.contains(name), "{name}: {message}");
    }
}

/// An F32 tensor's values.
fn read(view: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// gpt-oss's MXFP4 blocks whose shape disagrees with the router's D, or that are not u8,
/// are errors naming the tensor.
#[test]
fn gpt_oss_mxfp4_blocks_of_the_wrong_shape_or_dtype_are_named() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt_oss_mxfp4");
    let bytes = std::fs::read(dir.join("weights.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let rewrite = |name: &str, dtype: Dtype, shape: Vec<usize>| {
        let data = vec![0u8; shape.iter().product::<usize>() * dtype.bitsize() / 8];
        let mut views: BTreeMap<String, TensorView<'_>> = file.tensors().into_iter().collect();
        views.insert(
            name.to_string(),
            TensorView::new(dtype, shape, &data).unwrap(),
        );
        let bytes = safetensors::serialize(&views, None).unwrap();
        MoeWeights::from_safetensors_bytes(&bytes, Naming::Auto, None, "gpt-oss").unwrap_err()
    };
    let short = rewrite("experts.down_proj_blocks", Dtype::U8, vec![4, 32, 1, 16]);
    assert!(
        matches!(&short, MoeError::Tensor { name, .. } if name == "experts.down_proj_blocks"),
        "{short}"
    );
    let wrong_dtype = rewrite("experts.gate_up_proj_scales", Dtype::F32, vec![4, 64, 2]);
    assert!(
        matches!(&wrong_dtype, MoeError::Tensor { name, .. } if name == "experts.gate_up_proj_scales"),
        "{wrong_dtype}"
    );
}
