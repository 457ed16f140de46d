"""switch_moe against the third-party fixtures (labml_nn and Hugging Face outputs and
torch-autograd gradients, tests/fixtures), its errors, and the GIL released during a
forward. Tolerances: the fixtures' f32 bounds (see tests/backward_fixtures.rs)."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import switch_moe

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
CASES = ["labml_switch", "labml_switch_unscaled", "hf_switch", "hf_mixtral"]


def case(name):
    d = FIXTURES / name
    config = json.loads((d / "config.json").read_text())
    x = load_file(str(d / "input.safetensors"))["x"]
    return d, config, x


def assert_close(name, actual, expected, relative=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    tolerance = relative * np.abs(expected).max(initial=0.0) + 1e-6
    worst = np.abs(actual - expected).max(initial=0.0)
    assert worst <= tolerance, f"{name}: |diff| {worst:.3e} > {tolerance:.3e}"


@pytest.mark.parametrize("name", CASES)
def test_outputs_and_gradients_match_the_fixtures(name):
    d, config, x = case(name)
    layer = switch_moe.MoeLayer(str(d / "weights_native.safetensors"), config)
    out = layer.forward(x)
    expected = load_file(str(d / "expected.safetensors"))
    for key in ["y", "gates", "route_prob_max", "route_prob_sum"]:
        if key in expected:
            assert_close(f"{name}: {key}", out[key], expected[key])
    for key in ["routes", "counts"]:
        if key in expected:
            np.testing.assert_array_equal(out[key], expected[key].astype(np.int64))
    assert out["y"].shape == x.shape and out["y"].dtype == np.float32
    assert isinstance(out["n_dropped"], int) and isinstance(out["aux_loss"], float)

    grads_fixture = load_file(str(d / "grads.safetensors"))
    grads = layer.backward(
        grads_fixture["dy"],
        aux_loss_coef=float(grads_fixture["aux_loss_coef"]),
        z_loss_coef=float(grads_fixture["z_loss_coef"]),
    )
    rows = x.size // x.shape[-1] * config["top_k"]
    relative = 1e-5 + 8 * rows * np.finfo(np.float32).eps / 2
    names = [n for n in grads_fixture if n not in ("dy", "aux_loss_coef", "z_loss_coef")]
    assert sorted(grads) == sorted(names)
    for key in names:
        assert_close(f"{name}: d{key}", grads[key], grads_fixture[key], relative)


def test_weights_as_a_dict_in_their_own_naming_equal_the_file():
    d, config, x = case("labml_switch")
    from_file = switch_moe.MoeLayer(str(d / "weights.safetensors"), config)
    as_dict = load_file(str(d / "weights.safetensors"))
    from_dict = switch_moe.MoeLayer(as_dict, config)
    np.testing.assert_array_equal(from_dict.forward(x)["y"], from_file.forward(x)["y"])
    # float64 arrays are converted.
    as_f64 = {k: v.astype(np.float64) for k, v in as_dict.items()}
    np.testing.assert_array_equal(
        switch_moe.MoeLayer(as_f64, config).forward(x)["y"], from_file.forward(x)["y"]
    )


def test_a_gguf_layer_runs_forward_and_says_why_it_cannot_train():
    gguf = FIXTURES / "gguf" / "moe_layer.gguf"
    config = {"gated": True, "activation": "silu", "normalize_top_k": True}
    layer = switch_moe.MoeLayer(str(gguf), config, prefix="blk.0.")
    x = np.random.default_rng(0).standard_normal((5, layer.d_model), dtype=np.float32)
    out = layer.forward(x)
    assert out["y"].shape == x.shape
    assert layer.weight_formats != ["f32", "f32", "f32"]
    with pytest.raises(switch_moe.TrainingError, match="training needs f32"):
        layer.backward(np.ones_like(x))


def test_bad_arguments_raise_with_the_crates_message():
    d, config, x = case("labml_switch")
    weights = str(d / "weights_native.safetensors")
    with pytest.raises(switch_moe.ConfigError, match="top_kk") as error:
        switch_moe.MoeLayer(weights, {"top_kk": 2})
    assert isinstance(error.value, ValueError)
    with pytest.raises(switch_moe.FileError, match="missing.safetensors"):
        switch_moe.MoeLayer(str(d / "missing.safetensors"), config)
    with pytest.raises(ValueError, match="weights"):
        switch_moe.MoeLayer(42, config)
    with pytest.raises(switch_moe.TensorError):
        switch_moe.MoeLayer({"nonsense": np.zeros(3, np.float32)}, config)
    layer = switch_moe.MoeLayer(weights, config)
    with pytest.raises(switch_moe.TrainingError, match="forward first"):
        layer.backward(x)
    with pytest.raises(switch_moe.InputError):
        layer.forward(x[:, :, :-1])
    bad = x.copy()
    bad.reshape(-1, x.shape[-1])[3, 1] = np.nan
    with pytest.raises(switch_moe.InputError, match="token 3"):
        layer.forward(bad)
    with pytest.raises(ValueError, match="x"):
        layer.forward("not an array")
    layer.forward(x)
    with pytest.raises(ValueError, match="shape of y"):
        layer.backward(x[:1])


def test_backward_experts_gives_x_weights_and_expert_gradients_and_checks_its_turn():
    d, config, x = case("hf_mixtral")
    layer = switch_moe.MoeLayer(str(d / "weights_native.safetensors"), config)
    tokens = x.reshape(-1, x.shape[-1])
    t, n = tokens.shape[0], layer.num_experts
    index = np.stack([np.arange(t) % n, (np.arange(t) + 1) % n], axis=1)
    weights = np.linspace(0.1, 1.0, 2 * t, dtype=np.float32).reshape(t, 2)
    with pytest.raises(switch_moe.TrainingError, match="needs a forward_experts first"):
        layer.backward_experts(tokens)
    y = layer.forward_experts(tokens, index, weights)
    with pytest.raises(switch_moe.TrainingError, match="is backward_experts, not backward"):
        layer.backward(tokens)
    with pytest.raises(ValueError, match="shape of y"):
        layer.backward_experts(tokens[:1])
    dy = np.ones_like(tokens)
    grads = layer.backward_experts(dy)
    expected = {"x", "top_k_weights", "experts.w1", "experts.w2", "experts.w3"}
    assert set(grads) == expected, sorted(grads)
    assert grads["top_k_weights"].shape == (t, 2)
    # dL/dw[t, j] = dy·E_j(x[t]); with dy = 1, sum_j w[t, j]·dL/dw[t, j] = sum(y[t]) as
    # y[t] = sum_j w[t, j]·E_j(x[t]).
    np.testing.assert_allclose(
        (grads["top_k_weights"] * weights).sum(axis=1), y.sum(axis=1), rtol=1e-4, atol=1e-4
    )
    layer.forward(x)
    with pytest.raises(switch_moe.TrainingError, match="is backward, not backward_experts"):
        layer.backward_experts(tokens)


def test_the_gil_is_released_while_the_gpu_works():
    rng = np.random.default_rng(1)
    n, d, f = 8, 256, 1024
    weights = {
        "router.weight": rng.standard_normal((n, d), dtype=np.float32) * 0.05,
        "experts.w1": rng.standard_normal((n, f, d), dtype=np.float32) * 0.05,
        "experts.w2": rng.standard_normal((n, d, f), dtype=np.float32) * 0.05,
    }
    layer = switch_moe.MoeLayer(weights, {"drop_tokens": False})
    x = rng.standard_normal((4096, d), dtype=np.float32)
    layer.forward(x)  # warm-up: pipelines and buffers
    # A pure-Python thread counts; the forward must let it run.
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        time.sleep(0.1)
        first = counter[0]
        time.sleep(0.2)
        rate = (counter[0] - first) / 0.2  # while this thread sleeps (GIL released)
        before, started = counter[0], time.perf_counter()
        layer.forward(x)
        during, elapsed = counter[0] - before, time.perf_counter() - started
    finally:
        stop.set()
        spinner.join()
    # Holding the GIL, the forward would stop the counter for its whole run (the GPU's
    # own threads share the cores with it, hence the margin).
    assert during > 0.05 * rate * elapsed, (
        f"{during} counts in a {elapsed:.3f} s forward at {rate:.0f} counts/s: GIL held?"
    )


def test_adapter_names_the_device():
    info = switch_moe.adapter()
    assert set(info) == {"name", "backend", "device_type", "driver"}
    assert info["backend"]
