//! Third-party fixtures (tests/fixtures/, made by make_fixtures.sh from labml_nn and Hugging
//! Face transformers): the `forward` library path on their weights, in their own naming and
//! in the native one, on the CPU reference and on the GPU, must give what the original
//! modules gave: floats within |a − b| ≤ 1e-5 + 1e-4·|b|, integers exactly.

use std::path::{Path, PathBuf};

use switch_moe::forward_files::{run_forward_files, Device, ForwardRequest};
use switch_moe::tensor_io::parse_safetensors;
use switch_moe::MoeOutput;

fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

/// The tensor `name` of the expected file, as f64 values, if present.
fn expected_values(case: &str, name: &str) -> Option<Vec<f64>> {
    let bytes = std::fs::read(fixture_dir(case).join("expected.safetensors")).unwrap();
    let file = parse_safetensors(&bytes, case).unwrap();
    let view = file.tensor(name).ok()?;
    let data = view.data();
    Some(match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("{case}/{name}: unexpected dtype {other:?}"),
    })
}

fn compare(case: &str, what: &str, output: &MoeOutput) {
    let as_f64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let ints = |v: &[u32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let floats: [(&str, Vec<f64>); 6] = [
        ("y", as_f64(&output.y)),
        ("gates", as_f64(&output.gates)),
        ("route_prob_max", as_f64(&output.route_prob_max)),
        ("route_prob_sum", as_f64(&output.route_prob_sum)),
        ("aux_loss", vec![output.aux_loss as f64]),
        ("z_loss", vec![output.z_loss as f64]),
    ];
    let integers: [(&str, Vec<f64>); 4] = [
        ("routes", ints(&output.routes)),
        ("counts", ints(&output.counts)),
        ("kept", ints(&output.kept)),
        ("n_dropped", vec![output.n_dropped as f64]),
    ];
    let mut compared = 0;
    for (name, actual) in floats {
        let Some(expected) = expected_values(case, name) else {
            continue;
        };
        assert_eq!(actual.len(), expected.len(), "{case} {what}: {name} length");
        for (i, (a, b)) in actual.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                "{case} {what}: {name}[{i}] = {a}, expected {b}"
            );
        }
        compared += 1;
    }
    for (name, actual) in integers {
        let Some(expected) = expected_values(case, name) else {
            continue;
        };
        assert_eq!(actual, expected, "{case} {what}: {name}");
        compared += 1;
    }
    assert!(
        compared >= 2,
        "{case}: expected at least y and routes, compared {compared}"
    );
}

fn check_case(case: &str, weight_files: &[&str]) {
    let dir = fixture_dir(case);
    let out_dir =
        std::env::temp_dir().join(format!("switch-moe-fixture-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    for weights in weight_files {
        for device in [Device::Cpu, Device::Gpu] {
            let request = ForwardRequest {
                weights: dir.join(weights),
                input: dir.join("input.safetensors"),
                config: Some(dir.join("config.json")),
                output: out_dir.join("out.safetensors"),
                prefix: None,
                device,
                gradients: None,
            };
            let output = run_forward_files(&request)
                .unwrap_or_else(|e| panic!("{case} {weights} {device:?}: {e}"));
            compare(case, &format!("{weights} on {device:?}"), &output);
        }
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn labml_switch_with_dropping() {
    check_case(
        "labml_switch",
        &["weights.safetensors", "weights_native.safetensors"],
    );
}

#[test]
fn labml_switch_unscaled() {
    check_case(
        "labml_switch_unscaled",
        &["weights.safetensors", "weights_native.safetensors"],
    );
}

#[test]
fn hugging_face_switch_zeroes_dropped_tokens() {
    check_case(
        "hf_switch",
        &["weights.safetensors", "weights_native.safetensors"],
    );
}

#[test]
fn hugging_face_mixtral_both_layouts() {
    check_case(
        "hf_mixtral",
        &[
            "weights.safetensors",
            "weights_hf4.safetensors",
            "weights_native.safetensors",
        ],
    );
}
