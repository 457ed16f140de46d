//! The `forward` example as a program: exit code 0 and one summary line on success; exit
//! code 2, one line on stderr naming the culprit, and no output file on any error.

use std::path::{Path, PathBuf};
use std::process::Command;

use switch_moe::tensor_io::{serialize_tensors, OwnedTensor};
use switch_moe::{LayerShape, MoeWeights};

/// The `forward` example binary, which `cargo test` builds next to the test binaries.
fn forward_binary() -> PathBuf {
    let test_binary = std::env::current_exe().unwrap();
    let profile_dir = test_binary.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir
        .join("examples")
        .join(format!("forward{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: build the examples first",
        binary.display()
    );
    binary
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switch-moe-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Case {
    dir: PathBuf,
}

impl Case {
    fn new(name: &str) -> Self {
        let dir = scratch_dir(name);
        let shape = LayerShape {
            num_experts: 4,
            d_model: 8,
            d_ff: 12,
        };
        let weights = MoeWeights::random(shape, false, true, 3);
        std::fs::write(
            dir.join("w.safetensors"),
            weights.to_safetensors_bytes().unwrap(),
        )
        .unwrap();
        let x = switch_moe::rng::SeededRng::new(3).normal_vec(20 * 8);
        let input = [("x".to_string(), OwnedTensor::f32(vec![20, 8], &x))].into();
        std::fs::write(
            dir.join("x.safetensors"),
            serialize_tensors(&input).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("c.json"), r#"{"top_k": 2}"#).unwrap();
        Case { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Runs forward with the standard files, `overrides` replacing flags by name.
    fn run(&self, overrides: &[(&str, &str)], device: &str) -> std::process::Output {
        let mut args: Vec<(String, String)> = [
            ("--weights", self.path("w.safetensors")),
            ("--input", self.path("x.safetensors")),
            ("--config", self.path("c.json")),
            ("--output", self.path("y.safetensors")),
            ("--device", device.to_string()),
        ]
        .into_iter()
        .map(|(f, v)| (f.to_string(), v))
        .collect();
        for (flag, value) in overrides {
            match args.iter_mut().find(|(f, _)| f == flag) {
                Some(entry) => entry.1 = value.to_string(),
                None => args.push((flag.to_string(), value.to_string())),
            }
        }
        let flat: Vec<String> = args.into_iter().flat_map(|(f, v)| [f, v]).collect();
        Command::new(forward_binary()).args(flat).output().unwrap()
    }
}

/// A failing run: exit code 2, one stderr line (Mesa's own noise aside) naming `culprit`,
/// and no output file.
fn assert_fails(case: &Case, overrides: &[(&str, &str)], culprit: &str) {
    let _ = std::fs::remove_file(case.dir.join("y.safetensors"));
    let output = case.run(overrides, "cpu");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{overrides:?}: stderr {stderr}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("XDG_RUNTIME_DIR"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{overrides:?}: expected one error line, got {stderr}"
    );
    assert!(
        lines[0].contains(culprit),
        "{overrides:?}: {:?} does not name {culprit}",
        lines[0]
    );
    assert!(
        !case.dir.join("y.safetensors").exists(),
        "{overrides:?}: output written on error"
    );
}

#[test]
fn success_on_both_devices() {
    let case = Case::new("ok");
    for device in ["cpu", "gpu"] {
        let output = case.run(&[], device);
        assert!(
            output.status.success(),
            "{device}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("20 tokens, 4 experts, top-2"));
        assert!(case.dir.join("y.safetensors").exists());
    }
}

#[test]
fn errors_exit_2_name_the_culprit_and_write_nothing() {
    let case = Case::new("errors");
    std::fs::write(case.dir.join("bad_key.json"), r#"{"top_kk": 2}"#).unwrap();
    std::fs::write(
        case.dir.join("bad_value.json"),
        r#"{"drop_policy": "maybe"}"#,
    )
    .unwrap();
    std::fs::write(
        case.dir.join("garbage.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage",
    )
    .unwrap();
    let mut nan = switch_moe::rng::SeededRng::new(4).normal_vec(20 * 8);
    nan[13 * 8 + 5] = f32::NAN;
    let tensors = [("x".to_string(), OwnedTensor::f32(vec![20, 8], &nan))].into();
    std::fs::write(
        case.dir.join("nan.safetensors"),
        serialize_tensors(&tensors).unwrap(),
    )
    .unwrap();

    assert_fails(&case, &[("--config", &case.path("bad_key.json"))], "top_kk");
    assert_fails(
        &case,
        &[("--config", &case.path("bad_value.json"))],
        "drop_policy",
    );
    assert_fails(
        &case,
        &[("--config", &case.path("missing.json"))],
        "missing.json",
    );
    assert_fails(
        &case,
        &[("--weights", &case.path("garbage.safetensors"))],
        "garbage.safetensors",
    );
    assert_fails(&case, &[("--input", &case.path("w.safetensors"))], "`x`");
    assert_fails(
        &case,
        &[("--input", &case.path("nan.safetensors"))],
        "token 13",
    );
    assert_fails(
        &case,
        &[("--output", &case.path("no/such/dir/y.safetensors"))],
        "y.safetensors",
    );
    assert_fails(&case, &[("--device", "tpu")], "--device");
    assert_fails(&case, &[("--bogus", "1")], "--bogus");
}

#[test]
fn gradients_on_files_on_both_devices_and_their_errors() {
    let case = Case::new("grads");
    let dy = switch_moe::rng::SeededRng::new(5).normal_vec(20 * 8);
    let write_dy = |name: &str, shape: Vec<usize>, values: &[f32]| {
        let tensors = [("dy".to_string(), OwnedTensor::f32(shape, values))].into();
        std::fs::write(case.dir.join(name), serialize_tensors(&tensors).unwrap()).unwrap();
    };
    write_dy("dy.safetensors", vec![20, 8], &dy);
    write_dy("dy_wrong.safetensors", vec![10, 16], &dy);
    let grads = case.path("g.safetensors");
    let flags = |dy_file: &str| {
        vec![
            ("--grad-output", case.path(dy_file)),
            ("--grads-output", grads.clone()),
            ("--aux-loss-coef", "0.01".to_string()),
            ("--z-loss-coef", "0.001".to_string()),
        ]
    };
    let mut names_by_device = Vec::new();
    for device in ["cpu", "gpu"] {
        let _ = std::fs::remove_file(&grads);
        let owned = flags("dy.safetensors");
        let overrides: Vec<(&str, &str)> = owned.iter().map(|(f, v)| (*f, v.as_str())).collect();
        let output = case.run(&overrides, device);
        assert!(
            output.status.success(),
            "{device}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let bytes = std::fs::read(&grads).unwrap();
        let file = switch_moe::tensor_io::parse_safetensors(&bytes, "g").unwrap();
        let mut names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
        names.sort();
        assert_eq!(file.tensor("x").unwrap().shape(), &[20, 8]);
        assert_eq!(file.tensor("experts.w2").unwrap().shape(), &[4, 8, 12]);
        names_by_device.push(names);
    }
    assert_eq!(
        names_by_device[0],
        [
            "experts.b1",
            "experts.b2",
            "experts.w1",
            "experts.w2",
            "router.bias",
            "router.weight",
            "x"
        ]
    );
    assert_eq!(names_by_device[0], names_by_device[1]);

    // dy of the wrong shape, or missing: one line, and neither file written.
    let _ = std::fs::remove_file(&grads);
    let owned = flags("dy_wrong.safetensors");
    let overrides: Vec<(&str, &str)> = owned.iter().map(|(f, v)| (*f, v.as_str())).collect();
    assert_fails(&case, &overrides, "`dy`");
    let owned = flags("x.safetensors");
    let overrides: Vec<(&str, &str)> = owned.iter().map(|(f, v)| (*f, v.as_str())).collect();
    assert_fails(&case, &overrides, "`dy`");
    assert!(
        !case.dir.join("g.safetensors").exists(),
        "gradients written on error"
    );
    // --grad-output without --grads-output is a command-line error.
    assert_fails(
        &case,
        &[("--grad-output", &case.path("dy.safetensors"))],
        "--grads-output",
    );
}

/// `--config` is optional for a GGUF file (its metadata gives the family's config) and a
/// one-line error for safetensors.
#[test]
fn a_gguf_file_needs_no_config_and_safetensors_do() {
    let case = Case::new("no-config");
    let fixture = |file: &str| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf_converted/qwen2_moe")
            .join(file)
            .display()
            .to_string()
    };
    let run = |weights: &str, input: &str| {
        Command::new(forward_binary())
            .args(["--weights", weights, "--input", input, "--output"])
            .arg(case.path("y.safetensors"))
            .args(["--device", "cpu", "--prefix", "blk.0."])
            .output()
            .unwrap()
    };
    let output = run(&fixture("model.gguf"), &fixture("input.safetensors"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("24 tokens, 6 experts, top-2, 0 dropped"),
        "{stdout}"
    );
    std::fs::remove_file(case.dir.join("y.safetensors")).unwrap();
    let output = run(&case.path("w.safetensors"), &case.path("x.safetensors"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("w.safetensors") && stderr.contains("--config"),
        "{stderr}"
    );
    assert!(!case.dir.join("y.safetensors").exists());
}
