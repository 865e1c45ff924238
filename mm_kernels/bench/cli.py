"""``mm-bench KERNEL... | all``: times each kernel against eager and compiled PyTorch references.

Kernels are the modules of ``mm_kernels.bench`` that define ``KERNEL`` and ``cases()``.
``mm-bench cp [options]`` benchmarks context-parallel attention on spawned processes instead
(``mm_kernels.bench.cp``; ``mm-bench cp --help``). ``mm-bench hf [options]`` times Hugging Face training
steps with and without the fused kernels (``mm_kernels.bench.hf``; ``mm-bench hf --help``). ``mm-bench train
[options] [-- trainer flags]`` times mm-train's steps with its speed features on one after another
(``mm_kernels.bench.train``; ``mm-bench train --help``). ``mm-bench vlm [options]`` times mm-train's
multimodal path beside a plain transformers loop (``mm_kernels.bench.vlm``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pkgutil
import sys
from types import ModuleType

import torch

import mm_kernels.bench as bench_pkg
from mm_kernels.bench.harness import DTYPES, BenchResult, format_table, run_case

_NOT_KERNELS = {"harness", "cli", "plot"}


def kernel_modules() -> dict[str, ModuleType]:
    """{kernel name: benchmark module} for every benchmark module in mm_kernels.bench."""
    found = {}
    for info in pkgutil.iter_modules(bench_pkg.__path__):
        if info.name in _NOT_KERNELS:
            continue
        module = importlib.import_module(f"{bench_pkg.__name__}.{info.name}")
        if hasattr(module, "KERNEL") and hasattr(module, "cases"):
            found[module.KERNEL] = module
    return found


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv: list[str] | None, kernels: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mm-bench", description=__doc__)
    parser.add_argument("kernels", nargs="+", choices=[*kernels, "all"], metavar="KERNEL",
                        help=f"one or more of: {', '.join(kernels)}, or all")
    parser.add_argument("--dtype", default="bf16", help="comma-separated: fp32,bf16,fp16 (default bf16)")
    parser.add_argument("--device", default=_default_device())
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the speedups")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cp"]:
        from mm_kernels.bench.cp import run_cp_bench

        return run_cp_bench(argv[1:])
    if argv[:1] == ["hf"]:
        from mm_kernels.bench.hf import run_hf_bench

        return run_hf_bench(argv[1:])
    if argv[:1] == ["train"]:
        from mm_kernels.bench.train import run_train_bench

        return run_train_bench(argv[1:])
    if argv[:1] == ["vlm"]:
        from mm_kernels.bench.vlm import run_vlm_bench

        return run_vlm_bench(argv[1:])
    modules = kernel_modules()
    args = parse_args(argv, sorted(modules))
    names = sorted(modules) if "all" in args.kernels else args.kernels
    try:
        dtypes = [DTYPES[name] for name in args.dtype.split(",")]
    except KeyError as exc:
        print(f"mm-bench: --dtype: unknown dtype {exc}; expected {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    results: list[BenchResult] = []
    for name in names:
        for case in modules[name].cases(device=device, dtypes=dtypes, quick=args.quick):
            result = run_case(case, device, with_compile=not args.no_compile)
            results.append(result)
            print(f"{result.kernel} {result.mode} {result.shape} {result.dtype}: {result.ours_ms:.3f} ms",
                  file=sys.stderr, flush=True)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    if args.plot:
        from mm_kernels.bench.plot import plot_speedups

        plot_speedups(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
