"""``mm-bench hf --model llama qwen2 qwen3_moe qwen2_5_vl``: Hugging Face training steps with and without
mm_kernels' fused kernels, side by side.

For each model type, a randomly initialised model (``--size small``: hidden 512, 4 layers; the
vision-language models add a 2-block vision tower and one image per sample) and a copy of it patched
by :func:`apply_fused_kernels` train with AdamW on one fixed batch. Time: both train in one process,
their steps interleaved (the order alternating every round) so that a busy machine slows both alike;
reported are the median time per step after warm-up, tokens/s (batch x sequence length, image
placeholders included), the last loss of each (they should agree) and the median over rounds of the
fused/original ratio of back-to-back steps. Memory: each variant trains
two steps alone in a fresh process; reported is its peak above what it held before the first step
(CUDA: the allocator's peak; CPU: the process's peak resident set).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time

import torch

from mm_kernels.bench.harness import DTYPES, add_step_arguments, at_least, in_fresh_process, sync
from mm_kernels.bench.hf_models import MODEL_TYPES, SIZES

VARIANTS = ("original", "fused")


def _trainer(model: torch.nn.Module, inputs: dict, device: torch.device):
    """A function running one AdamW training step of ``model``; returns (seconds, loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> tuple[float, float]:
        sync(device)
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start, loss.item()

    return step


def _setup(model_type: str, size: str, dtype_name: str, device_name: str, batch: int, seq: int, threads: int):
    from mm_kernels.bench.hf_models import build_model, make_batch

    torch.set_num_threads(threads)
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    inputs = {key: value.to(device) for key, value in make_batch(model_type, batch, seq, size, dtype).items()}
    return build_model(model_type, size, dtype).to(device), inputs, device


def time_variants(model_type: str, size: str, dtype_name: str, device_name: str, batch: int, seq: int, steps: int,
                  warmup: int, threads: int) -> dict[str, dict]:
    """Both variants in this process, steps interleaved: {variant: {ms_per_step, tokens_per_s, loss, fused}}."""
    from mm_kernels.integrations.transformers import apply_fused_kernels

    original, inputs, device = _setup(model_type, size, dtype_name, device_name, batch, seq, threads)
    fused = copy.deepcopy(original)
    counts = apply_fused_kernels(fused).counts()
    steppers = {"original": _trainer(original, inputs, device), "fused": _trainer(fused, inputs, device)}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    losses = {}
    for round_ in range(warmup + steps):
        for variant in VARIANTS if round_ % 2 == 0 else reversed(VARIANTS):
            seconds, losses[variant] = steppers[variant]()
            if round_ >= warmup:
                times[variant].append(seconds)
    paired = statistics.median(f / o for f, o in zip(times["fused"], times["original"], strict=True))
    results = {}
    for variant in VARIANTS:
        ms = statistics.median(times[variant]) * 1e3
        results[variant] = {"ms_per_step": ms, "tokens_per_s": batch * seq / ms * 1e3, "loss": losses[variant],
                            "fused": counts if variant == "fused" else {}, "paired_time_ratio": paired}
    return results


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_step_memory(model_type: str, variant: str, size: str, dtype_name: str, device_name: str, batch: int,
                     seq: int, threads: int) -> float:
    """MB a variant's training step needs above what the built model held (two steps, run alone)."""
    from mm_kernels.integrations.transformers import apply_fused_kernels

    model, inputs, device = _setup(model_type, size, dtype_name, device_name, batch, seq, threads)
    if variant == "fused":
        apply_fused_kernels(model)
    step = _trainer(model, inputs, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device) / 2**20
    else:
        held = _resident_mb()
    for _ in range(2):
        step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - held
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - held


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mm-bench hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["llama"], choices=MODEL_TYPES, metavar="TYPE",
                        help=f"one or more of: {', '.join(MODEL_TYPES)} (default llama)")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=at_least(1), default=4)
    parser.add_argument("--seq", type=at_least(1), default=256, help="tokens per sequence (default 256)")
    add_step_arguments(parser, 8, "timed steps per variant, interleaved")
    args = parser.parse_args(argv)
    if args.seq < (SIZES[args.size].image_side // 2) ** 2 + 4:
        parser.error(f"--seq {args.seq} is too short for the image placeholder of the {args.size} vision models")
    return args


def format_rows(results: list[dict]) -> str:
    """Fixed-width table: one row per variant, then per model the fused/original ratios (time: the median
    over rounds of the ratio of the two steps run back to back, which a busy machine disturbs least)."""
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
            ratio = fused["paired_time_ratio"]
            rows.append([model, "fused/original", f"{ratio:.2f}x", f"{1 / ratio:.2f}x",
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
    shape = (args.size, args.dtype, args.device, args.batch, args.seq)
    results = []
    for model_type in args.model:
        timed = in_fresh_process(time_variants, model_type, *shape, args.steps, args.warmup, args.threads)
        for variant in VARIANTS:
            peak = in_fresh_process(peak_step_memory, model_type, variant, *shape, args.threads)
            results.append({"model": model_type, "variant": variant, **timed[variant], "peak_mb": peak})
            print(f"{model_type} {variant}: {timed[variant]['ms_per_step']:.1f} ms/step, {peak:.0f} MB",
                  file=sys.stderr, flush=True)
    print(format_rows(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "size": args.size, "batch": args.batch,
                       "seq": args.seq, "threads": args.threads, "torch": torch.__version__,
                       "results": results}, f, indent=2)
    return 0
