"""Aggregation at memory speed: the weighted mean of K client updates of D float32 values,
against this machine's memory-read bandwidth measured in the same run.

Read bandwidth is measured as the best of several ``torch.sum`` passes over the same (K, D)
matrix (a pure streaming read, no writes), with the same thread count. Aggregation reads
every update once, so its effective bandwidth is K * D * 4 bytes / time.

Run: .venv/bin/python benchmarks/aggregation.py [--clients 100] [--dim 1000000] [--threads 2]
Writes benchmarks/results/aggregation.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, save

from fedmosaic.algorithms.aggregate import WeightedMeanAccumulator, weighted_mean


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up: page-in, thread pool start
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k, d = args.clients, args.dim
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(k, d, generator=gen)
    weights = torch.randint(1, 1000, (k,), generator=gen).to(torch.float64)
    nbytes = deltas.numel() * 4

    read_s = best_seconds(lambda: deltas.sum(), args.repeat)
    mean_s = best_seconds(lambda: weighted_mean(deltas, weights), args.repeat)

    def streaming() -> torch.Tensor:
        acc = WeightedMeanAccumulator(d)
        for row, w in zip(deltas, weights.tolist()):
            acc.add(row, w)
        return acc.result()

    stream_s = best_seconds(streaming, max(3, args.repeat // 3))
    expected = (weights / weights.sum()).to(torch.float32) @ deltas
    assert torch.allclose(weighted_mean(deltas, weights), expected, atol=1e-6)
    assert torch.allclose(streaming(), expected, atol=1e-5)

    read_bw, mean_bw, stream_bw = nbytes / read_s, nbytes / mean_s, nbytes / stream_s
    payload = {
        "command": f"python benchmarks/aggregation.py --clients {k} --dim {d} "
                   f"--threads {args.threads} --repeat {args.repeat}",
        "machine": machine(),
        "clients": k, "dim": d, "bytes": nbytes,
        "read_bandwidth_gb_s": read_bw / 1e9,
        "weighted_mean_seconds": mean_s, "weighted_mean_gb_s": mean_bw / 1e9,
        "weighted_mean_fraction_of_read_bw": mean_bw / read_bw,
        "streaming_seconds": stream_s, "streaming_gb_s": stream_bw / 1e9,
        "streaming_fraction_of_read_bw": stream_bw / read_bw,
    }
    path = save("aggregation", payload)
    print(f"{k} updates x {d:,} float32 = {nbytes / 1e6:.0f} MB, {args.threads} threads")
    print(f"memory read bandwidth (torch.sum):   {read_bw / 1e9:6.2f} GB/s")
    print(f"weighted_mean (one mat-vec):         {mean_bw / 1e9:6.2f} GB/s = "
          f"{100 * mean_bw / read_bw:.0f}% of read bandwidth ({mean_s * 1e3:.1f} ms)")
    print(f"streaming accumulator (add_ each):   {stream_bw / 1e9:6.2f} GB/s = "
          f"{100 * stream_bw / read_bw:.0f}% of read bandwidth ({stream_s * 1e3:.1f} ms)")
    print(f"results in {path}")


if __name__ == "__main__":
    main()
