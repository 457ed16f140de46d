"""switch_moe.distributed.ExpertParallelMoE with W = 2 and 4 processes on one machine
(gloo on CPU, a file-store rendezvous, each process with its own adapter): on each rank's
tokens, the forward and the gradients equal a single-process MoeLayer holding every expert
(the parameters' gradients summed over the ranks' losses); uneven routing, a rank that
receives no token, heavy dropping with pass-through, top-2 across ranks, explicit expert
ranges; reruns the same bits; loss.backward() fills .grad alike. Tolerance: the f32 bound
of the layer's own backward tests, 8·rows·u relative to the largest value of each
tensor."""

import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.numpy import save_file

import switch_moe
from switch_moe.distributed import ExpertParallelMoE, even_expert_ranges

D, F, T = 16, 24, 20
U = np.finfo(np.float32).eps / 2

CASES = {
    # top-2 across ranks, gated, normalised, some dropping.
    "top2": dict(
        world=2, experts=4, bias=None,
        config={"top_k": 2, "gated": True, "activation": "silu", "normalize_top_k": True,
                "capacity_factor": 1.0},
    ),
    # Every token routed to rank 0's experts: rank 1 receives nothing; heavy dropping,
    # tokens passing through, unscaled gates.
    "one_rank_idle": dict(
        world=2, experts=4, bias=[6.0, 6.0, -30.0, -30.0],
        config={"top_k": 1, "capacity_factor": 1.0, "scale_by_prob": False},
    ),
    # Three experts over two ranks: explicit ranges.
    "explicit_ranges": dict(
        world=2, experts=3, bias=None, ranges=[(0, 1), (1, 3)],
        config={"top_k": 2, "capacity_factor": 1.5},
    ),
    # Four ranks, most tokens on rank 0's experts, nothing dropped.
    "four_ranks_uneven": dict(
        world=4, experts=8, bias=[3.0, 3.0, 0, 0, 0, 0, 0, 0],
        config={"top_k": 2, "drop_tokens": False, "activation": "gelu"},
    ),
}


def weights_for(experts, gated, bias):
    rng = np.random.default_rng(experts * 7 + gated)
    weights = {
        "router.weight": rng.standard_normal((experts, D), np.float32) * 0.5,
        "router.bias": np.asarray(bias or np.zeros(experts), np.float32),
        "experts.w1": rng.standard_normal((experts, F, D), np.float32) * 0.3,
        "experts.b1": rng.standard_normal((experts, F), np.float32) * 0.1,
        "experts.w2": rng.standard_normal((experts, D, F), np.float32) * 0.3,
        "experts.b2": rng.standard_normal((experts, D), np.float32) * 0.1,
    }
    if gated:
        weights["experts.w3"] = rng.standard_normal((experts, F, D), np.float32) * 0.3
        weights["experts.b3"] = rng.standard_normal((experts, F), np.float32) * 0.1
    return weights


def close(name, actual, expected, rows):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: {actual.shape} vs {expected.shape}"
    tolerance = 8 * rows * U * np.abs(expected).max(initial=0.0) + 1e-6
    worst = np.abs(actual - expected).max(initial=0.0)
    assert worst <= tolerance, f"{name}: |diff| {worst:.3e} > {tolerance:.3e}"


def check_rank(rank, world, path, case):
    spec = CASES[case]
    config = spec["config"]
    gated = bool(config.get("gated"))
    weights = weights_for(spec["experts"], gated, spec["bias"])
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((T, D), np.float32) for _ in range(world)]
    dys = [rng.standard_normal((T, D), np.float32) for _ in range(world)]
    alpha, beta = 0.01, 0.001

    moe = ExpertParallelMoE(path, config, expert_ranges=spec.get("ranges"))
    lo, hi = moe.expert_ranges[rank]
    assert moe.experts_w1.shape[0] == hi - lo, "the rank holds its slice only"
    out = moe(xs[rank])
    full = switch_moe.MoeLayer(weights, {**config, "naming": "native"})
    ref = full.forward(xs[rank])
    rows = D + F + T * config["top_k"]
    close(f"{case} rank {rank}: y", out["y"].detach(), ref["y"], rows)
    for key in ("routes", "counts", "kept"):
        np.testing.assert_array_equal(out[key].numpy(), ref[key], f"{case} rank {rank}: {key}")
    assert out["n_dropped"] == ref["n_dropped"]
    for key in ("gates", "route_prob_max", "route_prob_sum", "aux_loss", "z_loss"):
        close(f"{case} rank {rank}: {key}", out[key].detach(), ref[key], rows)
    # The same bits again.
    again = moe(xs[rank])
    assert torch.equal(again["y"], out["y"]), "rerun"

    grads = moe.backward(dys[rank], aux_loss_coef=alpha, z_loss_coef=beta)
    # The reference: every rank's loss on the single layer, the weights' gradients summed.
    total = {}
    for s in range(world):
        full.forward(xs[s])
        g = full.backward(dys[s], aux_loss_coef=alpha, z_loss_coef=beta)
        if s == rank:
            close(f"{case} rank {rank}: dx", grads["x"], g["x"], rows)
        for name, value in g.items():
            if name != "x":
                total[name] = total.get(name, 0) + value.astype(np.float64)
    rows_all = rows * world
    for name, value in total.items():
        expected = value if name.startswith("router.") else value[lo:hi]
        close(f"{case} rank {rank}: d{name}", grads[name], expected, rows_all)
    expected_names = {"x"} | set(total)
    assert set(grads) == expected_names, sorted(grads)
    # The module's own path: loss.backward() fills .grad with the same gradients.
    out = moe(torch.from_numpy(xs[rank]))
    (out["y"] * torch.from_numpy(dys[rank])).sum().add(alpha * out["aux_loss"]).add(
        beta * out["z_loss"]
    ).backward()
    for name, value in grads.items():
        if name != "x":
            parameter = getattr(moe, name.replace(".", "_"))
            np.testing.assert_array_equal(parameter.grad.numpy(), value, f"{case}: .grad {name}")
    # The all-reduced router gradient is the same on every rank.
    gathered = [torch.zeros(spec["experts"], D) for _ in range(world)]
    dist.all_gather(gathered, torch.from_numpy(grads["router.weight"]))
    assert all(torch.equal(g, gathered[0]) for g in gathered)


def worker(rank, world, store, path, case):
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world
    )
    try:
        check_rank(rank, world, path, case)
    except Exception:
        raise AssertionError(f"rank {rank}:\n{traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()


def run_ranks(case, tmp_path, seconds=300):
    spec = CASES[case]
    gated = bool(spec["config"].get("gated"))
    path = tmp_path / "moe.safetensors"
    save_file(weights_for(spec["experts"], gated, spec["bias"]), str(path))
    store = tmp_path / "store"
    context = mp.start_processes(
        worker,
        args=(spec["world"], str(store), str(path), case),
        nprocs=spec["world"],
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + seconds
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{case}: the ranks did not finish in {seconds} s")


@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_equals_the_single_process_layer(case, tmp_path):
    run_ranks(case, tmp_path)


def test_expert_ranges_split_evenly_or_say_why_not():
    assert even_expert_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="pass expert_ranges"):
        even_expert_ranges(6, 4)


def test_without_a_process_group_it_says_so():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE({}, {})
