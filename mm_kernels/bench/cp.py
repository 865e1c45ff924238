"""``mm-bench cp``: context-parallel attention on local gloo process groups, per algo and world size.

Each (algo, world size) runs on W spawned CPU processes with one thread each. Reported per run:
median time of one forward+backward (the slowest rank's), bytes each rank sends per
forward+backward, and each rank's compute time (thread CPU time inside the local attention
kernels, so ranks sharing cores still compare fairly) with the slowest/fastest ratio, next to the
FLOPs of the attention blocks each rank computes: with the causal zigzag layout every rank does the
same work. The first row is plain attention over the whole
sequence in one process (one thread) for scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from mm_kernels.bench.harness import DTYPES
from mm_kernels.ops.attention import attention_with_lse
from mm_kernels.parallel import HYBRID, RING, ULYSSES, cp_attention, record_cp_stats
from mm_kernels.parallel.spawn import run_ranks

ALGOS = {"ulysses": ULYSSES, "ring": RING, "hybrid": HYBRID}


@dataclasses.dataclass(frozen=True)
class CPBenchConfig:
    """Global problem: q [batch, seq, heads, head_dim], k/v with kv_heads; ``reps`` timed iterations."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    reps: int
    warmup: int = 2


@dataclasses.dataclass
class CPBenchResult:
    """One (algo, world size) run; times in ms, per forward+backward."""

    algo: str
    world_size: int
    ulysses_degree: int | None
    ms: float
    bytes_sent_per_rank: list[int]
    compute_ms_per_rank: list[float]
    compute_imbalance: float
    gflops_per_rank: list[float]


def _inputs(config: CPBenchConfig, seq: int) -> list[torch.Tensor]:
    dtype = DTYPES[config.dtype]
    shapes = [config.heads, config.kv_heads, config.kv_heads, config.heads]
    return [torch.randn(config.batch, seq, h, config.head_dim, dtype=dtype) for h in shapes]


def _bench_rank(rank: int, world: int, algo: str, degree: int | None, config: CPBenchConfig) -> dict:
    torch.manual_seed(rank)
    q, k, v, dout = _inputs(config, config.seq // world)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    times, compute, sent, flops = [], [], [], []
    for i in range(config.warmup + config.reps):
        for t in (q, k, v):
            t.grad = None
        dist.barrier()
        with record_cp_stats() as stats:
            start = time.perf_counter()
            cp_attention(q, k, v, algo, None, degree, causal=config.causal).backward(dout)
            elapsed = time.perf_counter() - start
        if i >= config.warmup:
            times.append(elapsed * 1e3)
            compute.append(stats.compute_cpu_s * 1e3)
            sent.append(stats.bytes_sent)
            flops.append(stats.flops)
    return {"ms": statistics.median(times), "compute_ms": statistics.median(compute), "bytes_sent": max(sent),
            "gflops": max(flops) / 1e9}


def measure(algo: str, world: int, degree: int | None, config: CPBenchConfig) -> CPBenchResult:
    """Runs ``algo`` on ``world`` spawned ranks and summarises the ranks' figures."""
    ranks = run_ranks(_bench_rank, world, algo, degree, config, timeout=600, collective_timeout=300)
    compute = [r["compute_ms"] for r in ranks]
    return CPBenchResult(algo=algo, world_size=world, ulysses_degree=degree, ms=max(r["ms"] for r in ranks),
                         bytes_sent_per_rank=[r["bytes_sent"] for r in ranks], compute_ms_per_rank=compute,
                         compute_imbalance=max(compute) / max(min(compute), 1e-9),
                         gflops_per_rank=[r["gflops"] for r in ranks])


def measure_single_process(config: CPBenchConfig) -> float:
    """Median ms of one forward+backward of attention over the whole sequence, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, k, v, dout = _inputs(config, config.seq)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        times = []
        for i in range(config.warmup + config.reps):
            start = time.perf_counter()
            attention_with_lse(q, k, v, causal=config.causal)[0].backward(dout)
            if i >= config.warmup:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def _runs(algos: list[str], worlds: list[int]) -> list[tuple[str, int, int | None]]:
    runs = []
    for world in worlds:
        for name in algos:
            if name != "hybrid":
                runs.append((ALGOS[name], world, None))
            elif world % 2 == 0 and world > 2:
                runs.append((HYBRID, world, 2))
    return runs


def format_results(results: list[CPBenchResult], single_ms: float) -> str:
    """Text table: one row per run, after the single-process row."""
    lines = [f"{'algo':>18} {'W':>2} {'U':>2} {'ms fwd+bwd':>11} {'MB sent/rank':>13} {'GFLOP/rank':>10} "
             f"{'imbalance':>9}  compute ms per rank",
             f"{'1 process':>18} {1:>2} {'-':>2} {single_ms:>11.1f} {0:>13.2f} {'-':>10} {'-':>9}  -"]
    for r in results:
        lines.append(f"{r.algo:>18} {r.world_size:>2} {r.ulysses_degree or '-':>2} {r.ms:>11.1f} "
                     f"{max(r.bytes_sent_per_rank) / 2**20:>13.2f} {max(r.gflops_per_rank):>10.2f} "
                     f"{r.compute_imbalance:>9.3f}  " + " ".join(f"{c:.1f}" for c in r.compute_ms_per_rank))
    return "\n".join(lines)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mm-bench cp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", default="ulysses,ring,hybrid", help="comma-separated: ulysses,ring,hybrid")
    parser.add_argument("--world-sizes", default="2,3,4", help="comma-separated world sizes (default 2,3,4)")
    parser.add_argument("--seq", type=int, default=2304, help="global sequence length (a multiple of 2W and W*U)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12, help="query heads (divisible by the Ulysses degree)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--no-causal", action="store_true", help="full attention instead of causal")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small problem, two ranks (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return parser.parse_args(argv)


def run_cp_bench(argv: list[str]) -> int:
    """Entry point of ``mm-bench cp [options]``; prints the table, returns the exit status."""
    args = _parse(argv)
    if args.quick:
        args.seq, args.heads, args.head_dim, args.reps, args.world_sizes = 96, 4, 16, 2, "2"
    config = CPBenchConfig(batch=args.batch, seq=args.seq, heads=args.heads, kv_heads=args.kv_heads or args.heads,
                           head_dim=args.head_dim, dtype=args.dtype, causal=not args.no_causal, reps=args.reps)
    try:
        runs = _runs(args.algos.split(","), [int(w) for w in args.world_sizes.split(",")])
    except KeyError as exc:
        print(f"mm-bench cp: --algos: unknown algo {exc}; expected {', '.join(ALGOS)}", file=sys.stderr)
        return 2
    single_ms = measure_single_process(config)
    results = []
    for algo, world, degree in runs:
        results.append(measure(algo, world, degree, config))
        print(f"{algo} W={world}: {results[-1].ms:.1f} ms", file=sys.stderr, flush=True)
    print(f"q [{config.batch}, {config.seq}, {config.heads}, {config.head_dim}], kv heads {config.kv_heads}, "
          f"{config.dtype}, {'causal' if config.causal else 'full'}; compute = thread CPU time in attention kernels")
    print(format_results(results, single_ms))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": dataclasses.asdict(config), "single_process_ms": single_ms, "torch": torch.__version__,
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cp_bench(sys.argv[1:]))
