"""A training step of labml_nn's SwitchFeedForward against the same module swapped for
switch_moe's GPU layer (`switch_moe.torch.SwitchFeedForward.from_labml`), on the same
machine, weights and tokens: forward alone (no grad), and a whole step (forward, labml's
loss with its load-balancing term, backward, an Adam step), median of runs after a warm-up.
labml's experts run in a Python loop on torch's CPU kernels (or CUDA when present); the
swap runs on the wgpu adapter the environment selects.

    python benches/labml_train_step.py [--experts 8,64] [--tokens 2048] [--d-model 256]
        [--d-ff 1024] [--runs 5] [--json FILE]
"""
import argparse
import json
import statistics
import time
from unittest import mock

import torch
from labml_nn.transformers.feed_forward import FeedForward
from labml_nn.transformers.switch import SwitchFeedForward as LabmlSwitch

from switch_moe import adapter
from switch_moe.torch import SwitchFeedForward


def parse_list(text):
    return [int(v) for v in text.split(",")]


def labml_module(n, d, f, seed=1):
    torch.manual_seed(seed)
    expert = FeedForward(d_model=d, d_ff=f, dropout=0.0)
    module = LabmlSwitch(
        capacity_factor=1.25,
        drop_tokens=True,
        is_scale_prob=True,
        n_experts=n,
        expert=expert,
        d_model=d,
    )
    with torch.no_grad():
        for e in module.experts:
            for p in e.parameters():
                torch.nn.init.normal_(p, std=0.05)
    return module


def median_ms(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(module, x, target, runs):
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    tokens = x.shape[0] * x.shape[1]

    def forward():
        with torch.no_grad():
            module(x)

    def step():
        optimizer.zero_grad()
        y, counts, route_prob_sum, _, _ = module(x)
        n = counts.shape[0]
        aux = n * ((counts / tokens) * (route_prob_sum / tokens)).sum()
        loss = torch.nn.functional.mse_loss(y, target) + 0.01 * aux
        loss.backward()
        optimizer.step()

    # labml drops a random choice of tokens; the identity keeps both runs comparable.
    with mock.patch.object(torch, "randperm", lambda n, *a, **k: torch.arange(n)):
        return median_ms(forward, runs), median_ms(step, runs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=parse_list, default=[8, 64])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"labml: torch {torch.__version__} on the CPU; switch_moe on {adapter()}")
    print(f"{'N':>4} {'T':>6} | {'labml fwd':>10} {'step':>10} {'step/fwd':>9} | "
          f"{'swap fwd':>10} {'step':>10} {'step/fwd':>9}")
    records = []
    for n in args.experts:
        original = labml_module(n, args.d_model, args.d_ff)
        swapped = SwitchFeedForward.from_labml(labml_module(n, args.d_model, args.d_ff))
        generator = torch.Generator().manual_seed(2)
        x = torch.randn(args.tokens // 16, 16, args.d_model, generator=generator)
        target = torch.randn(x.shape, generator=generator)
        labml_fwd, labml_step = measure(original, x, target, args.runs)
        swap_fwd, swap_step = measure(swapped, x, target, args.runs)
        print(f"{n:>4} {args.tokens:>6} | {labml_fwd:>10.1f} {labml_step:>10.1f} "
              f"{labml_step / labml_fwd:>9.2f} | {swap_fwd:>10.1f} {swap_step:>10.1f} "
              f"{swap_step / swap_fwd:>9.2f}")
        records.append({
            "n_experts": n, "tokens": args.tokens, "d_model": args.d_model,
            "d_ff": args.d_ff, "labml_forward_ms": labml_fwd, "labml_step_ms": labml_step,
            "swap_forward_ms": swap_fwd, "swap_step_ms": swap_step,
        })
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"adapter": adapter(), "torch": torch.__version__, "records": records},
                      out, indent=2)


if __name__ == "__main__":
    main()
