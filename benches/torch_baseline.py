"""PyTorch baseline for the bench example: the labml-style expert loop and a dense FFN of
the same FLOPs, in f32 with TF32 off, on CUDA when present (else the CPU).

    python benches/torch_baseline.py [--device cuda|cpu] [--experts 1,8,32,64,128]
        [--tokens 512,4096,16384] [--top-k 1,2] [--d-model 512] [--d-ff 2048] [--runs 5]
        [--json FILE]

Variants (dropless, ReLU FFN, like `cargo run --release --example bench`):
- torch_loop: router, softmax, top-k, then `for i in range(n_experts): experts[i](x[idx[i]])`
  with the outputs scattered back and weighted (labml_nn's SwitchFeedForward structure);
- torch_dense: one FFN over T·k tokens, the same FLOPs without routing.
"""
import argparse
import json
import statistics
import time

import torch


def parse_list(text):
    return [int(v) for v in text.split(",")]


def timed(fn, runs, device):
    """Median and min milliseconds of `runs` calls after one warm-up."""
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experts", type=parse_list, default=[1, 8, 32, 64, 128])
    parser.add_argument("--tokens", type=parse_list, default=[512, 4096, 16384])
    parser.add_argument("--top-k", type=parse_list, default=[1, 2])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    adapter = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {adapter}; torch {torch.__version__}; f32, TF32 off; median and min of {args.runs} runs")
    d, f = args.d_model, args.d_ff
    records = []
    print(f"{'variant':>12} {'N':>4} {'T':>6} {'k':>2} {'median ms':>10} {'min ms':>10} {'GFLOP/s':>9}")
    for tokens in args.tokens:
        for n in args.experts:
            for k in [k for k in args.top_k if k <= n]:
                torch.manual_seed(0)
                x = torch.randn(tokens, d, device=device)
                router = torch.nn.Linear(d, n).to(device)
                experts = [
                    torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.ReLU(), torch.nn.Linear(f, d)).to(device)
                    for _ in range(n)
                ]
                dense = torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.ReLU(), torch.nn.Linear(f, d)).to(device)
                dense_x = torch.randn(tokens * k, d, device=device)

                @torch.no_grad()
                def loop():
                    probs = torch.softmax(router(x), dim=-1)
                    gates, routes = torch.topk(probs, k, dim=-1)
                    out = torch.zeros_like(x)
                    flat_routes = routes.reshape(-1)
                    for i in range(n):
                        index = torch.eq(flat_routes, i).nonzero(as_tuple=True)[0]
                        token = index // k
                        result = experts[i](x[token]) * gates.reshape(-1)[index, None]
                        out.index_add_(0, token, result)
                    return out

                @torch.no_grad()
                def dense_ffn():
                    return dense(dense_x)

                flops = 2.0 * 2.0 * tokens * k * d * f
                for name, fn in [("torch_loop", loop), ("torch_dense", dense_ffn)]:
                    median, minimum = timed(fn, args.runs, device)
                    gflops = flops / (median * 1e-3) / 1e9
                    print(f"{name:>12} {n:>4} {tokens:>6} {k:>2} {median:>10.2f} {minimum:>10.2f} {gflops:>9.1f}")
                    records.append({
                        "variant": name, "n_experts": n, "tokens": tokens, "d_model": d, "d_ff": f,
                        "top_k": k, "skew": 1, "ms_median": median, "ms_min": minimum, "gflops": gflops,
                        "dispatches": None, "adapter": adapter, "backend": f"torch-{device.type}",
                    })
    if args.json:
        with open(args.json, "w") as out:
            json.dump(records, out, indent=1)


if __name__ == "__main__":
    main()
