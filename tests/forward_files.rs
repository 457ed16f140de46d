//! The `forward` tool's file contract through its library path: outputs on both devices,
//! and errors that name the culprit and leave no output file.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use switch_moe::forward_files::{read_input, run_forward_files, Device, ForwardRequest};
use switch_moe::tensor_io::{parse_safetensors, read_f32_values, serialize_tensors, OwnedTensor};
use switch_moe::{MoeError, MoeWeights};

/// A fresh folder under the system temp dir for one test.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switch-moe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes weights, input and config for a small layer into `dir`.
fn write_case(dir: &Path, config_json: &str) -> ForwardRequest {
    let weights = MoeWeights::random(shape(4, 16, 24), false, true, 5);
    std::fs::write(
        dir.join("weights.safetensors"),
        weights.to_safetensors_bytes().unwrap(),
    )
    .unwrap();
    let x = tokens(48, 16, 5);
    let input = [("x".to_string(), OwnedTensor::f32(vec![8, 6, 16], &x))].into();
    std::fs::write(
        dir.join("input.safetensors"),
        serialize_tensors(&input).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), config_json).unwrap();
    ForwardRequest {
        weights: dir.join("weights.safetensors"),
        input: dir.join("input.safetensors"),
        config: Some(dir.join("config.json")),
        output: dir.join("out.safetensors"),
        prefix: None,
        device: Device::Gpu,
        gradients: None,
    }
}

fn read_output_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let file = parse_safetensors(&bytes, "out").unwrap();
    let view = file
        .tensor(name)
        .unwrap_or_else(|_| panic!("output lacks {name}"));
    (view.shape().to_vec(), view.data().to_vec())
}

#[test]
fn gpu_and_cpu_write_every_statistic() {
    let dir = scratch_dir("both");
    let gpu_request = write_case(&dir, r#"{"top_k": 2, "capacity_factor": 0.75}"#);
    let gpu = run_forward_files(&gpu_request).unwrap();
    let cpu_request = ForwardRequest {
        device: Device::Cpu,
        output: dir.join("cpu.safetensors"),
        ..gpu_request.clone()
    };
    let cpu = run_forward_files(&cpu_request).unwrap();
    let config =
        switch_moe::MoeConfig::from_json_file(gpu_request.config.as_ref().unwrap()).unwrap();
    let weights = MoeWeights::from_safetensors(&gpu_request.weights, config.naming, None).unwrap();
    let x = read_input(&gpu_request.input).unwrap().data;
    assert_matches_reference(&config, &weights, &x, &gpu, &cpu);

    let expected = [
        ("y", vec![8, 6, 16]),
        ("routes", vec![48, 2]),
        ("gates", vec![48, 2]),
        ("route_prob_max", vec![48]),
        ("counts", vec![4]),
        ("kept", vec![4]),
        ("route_prob_sum", vec![4]),
        ("n_dropped", vec![]),
        ("aux_loss", vec![]),
        ("z_loss", vec![]),
    ];
    for path in [&gpu_request.output, &cpu_request.output] {
        for (name, shape) in &expected {
            assert_eq!(&read_output_tensor(path, name).0, shape, "{name}");
        }
        let (_, dropped) = read_output_tensor(path, "n_dropped");
        assert_eq!(
            i64::from_le_bytes(dropped.try_into().unwrap()),
            gpu.n_dropped as i64
        );
    }
    let y = {
        let bytes = std::fs::read(&gpu_request.output).unwrap();
        let file = parse_safetensors(&bytes, "out").unwrap();
        read_f32_values(&file.tensor("y").unwrap(), "y")
            .unwrap()
            .data
    };
    assert_eq!(y, gpu.y);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs a request that must fail; checks that no output (nor temporary file) appeared.
fn expect_failure(request: &ForwardRequest) -> MoeError {
    let error = run_forward_files(request).expect_err("expected an error");
    let dir = request.output.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.contains("out"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "files written on error: {leftovers:?}"
    );
    error
}

#[test]
fn errors_name_the_culprit_and_write_nothing() {
    let dir = scratch_dir("errors");
    let good = write_case(&dir, "{}");

    let bad_config = ForwardRequest {
        config: Some(dir.join("bad.json")),
        ..good.clone()
    };
    std::fs::write(bad_config.config.as_ref().unwrap(), r#"{"top_k": 9}"#).unwrap();
    assert!(matches!(expect_failure(&bad_config), MoeError::Config { key, .. } if key == "top_k"));

    let missing_weights = ForwardRequest {
        weights: dir.join("none.safetensors"),
        ..good.clone()
    };
    assert!(matches!(
        expect_failure(&missing_weights),
        MoeError::File { .. }
    ));

    let garbage_input = ForwardRequest {
        input: dir.join("garbage.safetensors"),
        ..good.clone()
    };
    std::fs::write(&garbage_input.input, b"garbage").unwrap();
    assert!(matches!(
        expect_failure(&garbage_input),
        MoeError::File { .. }
    ));

    let no_x = ForwardRequest {
        input: dir.join("no_x.safetensors"),
        ..good.clone()
    };
    let tensors = [("y".to_string(), OwnedTensor::f32(vec![1, 16], &[0.0; 16]))].into();
    std::fs::write(&no_x.input, serialize_tensors(&tensors).unwrap()).unwrap();
    assert!(matches!(expect_failure(&no_x), MoeError::Tensor { name, .. } if name == "x"));

    let wrong_width = ForwardRequest {
        input: dir.join("wide.safetensors"),
        ..good.clone()
    };
    let tensors = [("x".to_string(), OwnedTensor::f32(vec![2, 17], &[0.0; 34]))].into();
    std::fs::write(&wrong_width.input, serialize_tensors(&tensors).unwrap()).unwrap();
    assert!(matches!(
        expect_failure(&wrong_width),
        MoeError::InputShape { .. }
    ));

    for device in [Device::Gpu, Device::Cpu] {
        let non_finite = ForwardRequest {
            input: dir.join("nan.safetensors"),
            device,
            ..good.clone()
        };
        let mut x = tokens(10, 16, 1);
        x[7 * 16 + 2] = f32::NAN;
        let tensors = [("x".to_string(), OwnedTensor::f32(vec![10, 16], &x))].into();
        std::fs::write(&non_finite.input, serialize_tensors(&tensors).unwrap()).unwrap();
        assert!(matches!(
            expect_failure(&non_finite),
            MoeError::NonFiniteInput { token: 7 }
        ));
    }

    let unwritable = ForwardRequest {
        output: dir.join("no/such/dir/out.safetensors"),
        ..good.clone()
    };
    assert!(matches!(
        run_forward_files(&unwritable),
        Err(MoeError::File { .. })
    ));

    // A failed run leaves an existing output untouched.
    std::fs::write(&good.output, b"previous").unwrap();
    let _ = run_forward_files(&bad_config);
    assert_eq!(std::fs::read(&good.output).unwrap(), b"previous");
    std::fs::remove_dir_all(&dir).unwrap();
}
