//! Third-party gradient fixtures (tests/fixtures/<case>/grads.safetensors, made by
//! make_fixtures.sh through make_grad_fixtures.py with torch autograd in float64 through
//! the labml_nn and Hugging Face modules themselves): the CPU reference backward must
//! reproduce them, and so must the GPU backward run through the `forward` tool's file
//! contract (`--grad-output` / `--grads-output`).
//!
//! Tolerance: the crate recomputes the forward in f32, so each value it differentiates carries a
//! relative error of order (D + F + N)·2⁻²⁴ ≈ 3e-6 of the magnitudes summed into it (D=16, F=32,
//! N=4), while the CPU's gradient sums run in f64: per tensor |a − b| ≤ 1e-5 · max|b| + 1e-6.
//! The GPU also sums the gradients in f32, over up to T·k rows: its bound adds
//! 8·(T·k)·2⁻²⁴ · max|b|.

use std::path::{Path, PathBuf};

use switch_moe::cpu_backward::{backward, LossCoefficients};
use switch_moe::forward_files::{run_forward_files, Device, ForwardRequest, GradientRequest};
use switch_moe::tensor_io::{parse_safetensors, read_f32, F32Tensor};
use switch_moe::{MoeConfig, MoeWeights, Naming};

fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

fn read_file(case: &str, file: &str) -> Vec<u8> {
    let path = fixture_dir(case).join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Tensor `name` of `bytes` (the file `file` of `case`) as f32, or None when absent.
fn tensor(bytes: &[u8], case: &str, file: &str, name: &str) -> Option<F32Tensor> {
    let origin = format!("{case}/{file}");
    let st = parse_safetensors(bytes, &origin).unwrap();
    let view = st.tensor(name).ok()?;
    Some(read_f32(&view, name).unwrap_or_else(|e| panic!("{origin}: {e}")))
}

fn check_tensor(case: &str, name: &str, actual: &[f32], expected: &F32Tensor, relative: f64) {
    assert_eq!(
        actual.len(),
        expected.data.len(),
        "{case}: gradient {name} has {} values, fixture {:?}",
        actual.len(),
        expected.shape
    );
    let max_abs = expected
        .data
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let tol = relative * max_abs + 1e-6;
    let mut worst = (0.0f64, 0usize);
    for (i, (&a, &b)) in actual.iter().zip(&expected.data).enumerate() {
        let diff = (a as f64 - b as f64).abs();
        assert!(
            diff <= tol,
            "{case}: gradient {name}[{i}] (shape {:?}) = {a}, torch gives {b}: |diff| {diff:.3e} > \
             tol {tol:.3e} (max|torch {name}| = {max_abs:.3e})",
            expected.shape
        );
        if diff > worst.0 {
            worst = (diff, i);
        }
    }
    eprintln!(
        "{case}: {name:<14} max|diff| {:.2e} at {} (tol {tol:.2e}, max|b| {max_abs:.2e})",
        worst.0, worst.1
    );
}

fn check_case(case: &str) {
    let weights_bytes = read_file(case, "weights_native.safetensors");
    let weights = MoeWeights::from_safetensors_bytes(
        &weights_bytes,
        Naming::Auto,
        None,
        &format!("{case}/weights_native.safetensors"),
    )
    .unwrap_or_else(|e| panic!("{case}: weights: {e}"));
    let config_text = String::from_utf8(read_file(case, "config.json")).unwrap();
    let config =
        MoeConfig::from_json_str(&config_text).unwrap_or_else(|e| panic!("{case}: config: {e}"));
    let input = read_file(case, "input.safetensors");
    let x = tensor(&input, case, "input.safetensors", "x").expect("input has x");
    let grads_bytes = read_file(case, "grads.safetensors");
    let grad = |name: &str| tensor(&grads_bytes, case, "grads.safetensors", name);
    let dy = grad("dy").expect("grads.safetensors has dy");
    assert_eq!(dy.shape, x.shape, "{case}: dy has the shape of y (= x)");
    let scalar = |name: &str| {
        let t = grad(name).unwrap_or_else(|| panic!("{case}: grads.safetensors lacks {name}"));
        assert_eq!(t.data.len(), 1, "{case}: {name} is a scalar");
        t.data[0]
    };
    let coefficients = LossCoefficients {
        aux: scalar("aux_loss_coef"),
        z: scalar("z_loss_coef"),
    };

    let cpu = backward(&config, &weights, &x.data, &x.shape, &dy.data, coefficients)
        .unwrap_or_else(|e| panic!("{case}: backward: {e}"));
    check_gradients(case, &cpu.named(), &grad, 1e-5);

    // The GPU through the files: the fixture's dy in a file of its own, the gradients out.
    let dir = std::env::temp_dir().join(format!("switch-moe-grads-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dy_file = dir.join("dy.safetensors");
    let mut dy_tensors = std::collections::BTreeMap::new();
    dy_tensors.insert(
        "dy".to_string(),
        switch_moe::tensor_io::OwnedTensor::f32(dy.shape.clone(), &dy.data),
    );
    std::fs::write(
        &dy_file,
        switch_moe::tensor_io::serialize_tensors(&dy_tensors).unwrap(),
    )
    .unwrap();
    let request = ForwardRequest {
        weights: fixture_dir(case).join("weights_native.safetensors"),
        input: fixture_dir(case).join("input.safetensors"),
        config: Some(fixture_dir(case).join("config.json")),
        output: dir.join("out.safetensors"),
        prefix: None,
        device: Device::Gpu,
        gradients: Some(GradientRequest {
            grad_output: dy_file,
            grads_output: dir.join("grads.safetensors"),
            coefficients,
        }),
    };
    run_forward_files(&request).unwrap_or_else(|e| panic!("{case}: GPU backward: {e}"));
    let written = std::fs::read(dir.join("grads.safetensors")).unwrap();
    let names: Vec<String> = parse_safetensors(&written, "grads")
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let gpu: Vec<(String, Vec<f32>)> = names
        .iter()
        .map(|name| {
            (
                name.clone(),
                tensor(&written, case, "GPU grads", name).unwrap().data,
            )
        })
        .collect();
    let gpu_named: Vec<(&str, &[f32])> = gpu
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    let rows = x.data.len() / x.shape[x.shape.len() - 1] * config.top_k;
    check_gradients(
        &format!("{case} (GPU)"),
        &gpu_named,
        &grad,
        1e-5 + 8.0 * rows as f64 * f32::EPSILON as f64 / 2.0,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every gradient the fixture has against `ours` (name, values), and none missing on
/// either side.
fn check_gradients(
    case: &str,
    ours: &[(&str, &[f32])],
    grad: &dyn Fn(&str) -> Option<F32Tensor>,
    relative: f64,
) {
    const NAMES: [&str; 9] = [
        "x",
        "router.weight",
        "router.bias",
        "experts.w1",
        "experts.b1",
        "experts.w2",
        "experts.b2",
        "experts.w3",
        "experts.b3",
    ];
    for (name, _) in ours {
        assert!(NAMES.contains(name), "{case}: unexpected gradient {name}");
    }
    let ours = NAMES.map(|name| {
        (
            name,
            ours.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, values)| *values),
        )
    });
    let mut compared = 0;
    for (name, actual) in ours {
        let expected = grad(name);
        match (actual, expected) {
            (Some(actual), Some(expected)) => {
                check_tensor(case, name, actual, &expected, relative);
                compared += 1;
            }
            (None, None) => {}
            (Some(_), None) => panic!("{case}: the crate gives {name}, the fixture has none"),
            (None, Some(_)) => panic!("{case}: the fixture has {name}, the crate gives none"),
        }
    }
    assert!(compared >= 4, "{case}: compared only {compared} gradients");
}

#[test]
fn labml_switch_gradients_with_dropping_and_losses() {
    check_case("labml_switch");
}

#[test]
fn labml_switch_unscaled_gradients() {
    check_case("labml_switch_unscaled");
}

#[test]
fn hugging_face_switch_gradients_zero_dropped() {
    check_case("hf_switch");
}

#[test]
fn hugging_face_mixtral_gradients_with_losses() {
    check_case("hf_mixtral");
}
