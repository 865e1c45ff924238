"""``mm-bench hf --model llama qwen2 qwen3_moe qwen2_5_vl``: Hugging Face training steps with and without
mm_kernels' fused kernels, side by side.

For each model type, a randomly initialised model (``--size small``: hidden 512, 4 layers; the
vision-language models add a 2-block vision tower and one image per sample) trains with AdamW on one
fixed batch, once as built and once after :func:`apply_fused_kernels`, each in a fresh process with
the same weights and data. Reported per variant: the median time per step after warm-up, tokens/s
(batch x sequence length, image placeholders included), the peak memory of a step (CUDA: allocator
peak; CPU: growth of the process's peak resident set over the memory held before the first step),
the last loss (the two variants should agree) and what the patch fused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import statistics
import sys
import time

import torch

from mm_kernels.bench.harness import DTYPES
from mm_kernels.bench.hf_models import MODEL_TYPES, SIZES

VARIANTS = ("original", "fused")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(model_type: str, variant: str, size: str, dtype_name: str, device_name: str, batch: int, seq: int,
                steps: int, warmup: int, threads: int) -> dict:
    """Trains one variant for warmup + steps steps in this process; returns its measurements."""
    from mm_kernels.bench.hf_models import build_model, make_batch
    from mm_kernels.integrations.transformers import apply_fused_kernels

    torch.set_num_threads(threads)
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    model = build_model(model_type, size, dtype).to(device)
    fused = apply_fused_kernels(model).counts() if variant == "fused" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = {key: value.to(device) for key, value in make_batch(model_type, batch, seq, size, dtype).items()}

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    held = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device) / 2**20
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - held
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - held
    step_ms = statistics.median(times) * 1e3
    return {"model": model_type, "variant": variant, "ms_per_step": step_ms, "tokens_per_s": batch * seq / step_ms * 1e3,
            "peak_mb": peak, "loss": loss, "fused": fused}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mm-bench hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["llama"], choices=MODEL_TYPES, metavar="TYPE",
                        help=f"one or more of: {', '.join(MODEL_TYPES)} (default llama)")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"CPU threads per run (default {torch.get_num_threads()})")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.seq < (SIZES[args.size].image_side // 2) ** 2 + 4:
        parser.error(f"--seq {args.seq} is too short for the image placeholder of the {args.size} vision models")
    return args


def format_rows(results: list[dict]) -> str:
    """Fixed-width table: one row per variant, then the fused/original ratios per model."""
    header = ["model", "variant", "ms/step", "tokens/s", "peak MB", "loss", "fused modules"]
    rows = []
    for result in results:
        fused = ", ".join(f"{kind} {n}" for kind, n in sorted(result["fused"].items())) or "-"
        rows.append([result["model"], result["variant"], f"{result['ms_per_step']:.1f}",
                     f"{result['tokens_per_s']:.0f}", f"{result['peak_mb']:.0f}", f"{result['loss']:.4f}", fused])
    by_model: dict[str, dict[str, dict]] = {}
    for result in results:
        by_model.setdefault(result["model"], {})[result["variant"]] = result
    for model, pair in by_model.items():
        if set(pair) == set(VARIANTS):
            original, fused = pair["original"], pair["fused"]
            rows.append([model, "fused/original", f"{fused['ms_per_step'] / original['ms_per_step']:.2f}x",
                         f"{fused['tokens_per_s'] / original['tokens_per_s']:.2f}x",
                         f"{fused['peak_mb'] / max(original['peak_mb'], 1e-9):.2f}x", "", ""])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows])


def run_hf_bench(argv: list[str]) -> int:
    """Entry point of ``mm-bench hf``; returns the exit status."""
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("mm-bench hf: transformers is not installed (pip install 'mm-kernels[hf]')", file=sys.stderr)
        return 2
    results = []
    context = multiprocessing.get_context("spawn")
    for model_type in args.model:
        for variant in VARIANTS:
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(run_variant, model_type, variant, args.size, args.dtype, args.device, args.batch,
                                     args.seq, args.steps, args.warmup, args.threads).result()
            results.append(result)
            print(f"{model_type} {variant}: {result['ms_per_step']:.1f} ms/step", file=sys.stderr, flush=True)
    print(format_rows(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "size": args.size, "batch": args.batch,
                       "seq": args.seq, "threads": args.threads, "torch": torch.__version__,
                       "results": results}, f, indent=2)
    return 0
