"""Expert parallelism on one machine or several: every rank holds the router and its slice
of the experts, routes its own tokens and exchanges them in two all-to-alls.

    torchrun --nproc-per-node 2 python/examples/expert_parallel.py
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 \\
        python/examples/expert_parallel.py --experts 64

Prints, per rank, the forward's parts (route, exchange, experts, combine), the token rows
moved per token, the single-process layer's forward on the same tokens for comparison, and
a few training steps (SGD through torch autograd: the experts' gradients come from every
rank's tokens, the router's are all-reduced).
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import save_file

import switch_moe
from switch_moe.distributed import ExpertParallelMoE


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--weights", help="a safetensors file (native names); default: "
                        "seeded random weights of the given shape, written by rank 0")
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" \
        else torch.device("cpu")
    n, d, f = args.experts, args.d_model, args.d_ff
    args.weights = args.weights or f"expert_parallel_moe_n{n}_d{d}_f{f}.safetensors"
    if rank == 0 and not os.path.exists(args.weights):
        rng = np.random.default_rng(0)
        weights = {
            "router.weight": rng.standard_normal((n, d)) * 0.1,
            "experts.w1": rng.standard_normal((n, f, d)) / np.sqrt(d),
            "experts.w2": rng.standard_normal((n, d, f)) / np.sqrt(f),
        }
        save_file({k: v.astype(np.float32) for k, v in weights.items()}, args.weights)
    dist.barrier()
    config = {"top_k": args.top_k, "capacity_factor": 1.25}
    moe = ExpertParallelMoE(args.weights, config).to(device)
    x = torch.from_numpy(
        np.random.default_rng(1 + rank).standard_normal((args.tokens, d), np.float32)
    ).to(device)

    parts, forwards = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            out = moe(x, profile=True)
            forwards.append(time.perf_counter() - start)
            parts.append(moe.last_times)
    # The single-process layer (every expert) on the same tokens, for comparison.
    single = switch_moe.MoeLayer(args.weights, config)
    single_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        reference = single.forward(x.cpu().numpy())
        single_times.append(time.perf_counter() - start)
    worst = float(np.abs(out["y"].cpu().numpy() - reference["y"]).max())
    # The f32 bound of a dot of D then of F terms, relative to the largest output.
    bound = 8 * (d + f) * np.finfo(np.float32).eps / 2 * float(np.abs(reference["y"]).max())
    if worst > bound + 1e-6:
        raise SystemExit(f"rank {rank}: max |y - single| {worst:.3e} exceeds {bound:.3e}")
    median = statistics.median
    part_line = ", ".join(
        f"{name} {1e3 * median(p[name] for p in parts):.1f}"
        for name in ("route", "exchange", "experts", "combine")
    )
    sent = moe.last_bytes["sent"] / moe.last_bytes["tokens"]
    dist.barrier()
    for r in range(world):
        if r == rank:
            print(
                f"rank {rank}/{world} ({backend}, {switch_moe.adapter()['name']}): "
                f"experts {moe.expert_ranges[rank]}, forward {1e3 * median(forwards):.1f} ms "
                f"({part_line} ms); single-process forward {1e3 * median(single_times):.1f} "
                f"ms; bytes sent to other ranks per token {sent:.0f}; "
                f"n_dropped {out['n_dropped']}; "
                f"max |y - single| {worst:.2e}",
                flush=True,
            )
        dist.barrier()

    # Training steps: a toy regression target.
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.5)
    target = torch.tanh(x.flip(-1))
    for step in range(args.steps):
        optimizer.zero_grad()
        out = moe(x)
        loss = ((out["y"] - target) ** 2).mean() + 0.01 * out["aux_loss"]
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item() / world:.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
