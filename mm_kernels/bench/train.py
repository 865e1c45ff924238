"""``mm-bench train``: mm-train's tiny GPT with its speed features switched on one after another.

Rows, each adding one feature to the row above: the baseline (glibc malloc's defaults, megatron's
attention with its softmax in fp32, megatron's norm and SwiGLU), then malloc tuning (mm-train's
default; ``--no-malloc-tuning`` off), the softmax in the scores' dtype (Megatron's default;
``--attention-softmax-in-fp32`` off), ``--use-flash-attn``, ``--use-fused-rmsnorm`` and
``--use-fused-swiglu``. Each variant trains in a fresh process, built by mm-train's own command line
(``python -m mm_train`` would train the same model) and stepped through its engine; ``--rounds``
rounds run every variant once, in alternating order, so that a busy machine slows all alike.
Reported: the median time per step after ``--warmup`` steps (median over rounds of each round's
median), tokens/s (global batch x sequence length per step), minor page faults per step, the last
loss (the variants compute the same model: they agree within bf16 rounding) and the speed-ups
against the row above and the baseline (medians over rounds of the paired ratios).

Default model: 4 layers, hidden 256, 8 heads, sequence 512, micro-batch 4, global batch 8, bf16,
RMSNorm and SwiGLU, no dropout, the shipped corpus. Trainer flags after ``--`` are appended.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from mm_kernels.bench.harness import add_step_arguments, at_least, in_fresh_process, sync

MODEL = ("--num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 512 --micro-batch-size 4 "
         "--global-batch-size 8 --normalization RMSNorm --swiglu --position-embedding-type rope "
         "--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --lr 1e-4 --num-workers 0").split()
QUICK_MODEL = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 "
               "--global-batch-size 4 --normalization RMSNorm --swiglu --position-embedding-type rope "
               "--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --lr 1e-4 --num-workers 0").split()
DTYPE_FLAGS = {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp32": []}

# (feature, trainer flags while it is off, trainer flags once it is on), in the order the rows add them.
FEATURES = (
    ("malloc tuning", ["--no-malloc-tuning"], []),
    ("softmax in bf16/fp16", ["--attention-softmax-in-fp32"], []),
    ("flash attention", [], ["--use-flash-attn"]),
    ("fused RMSNorm", [], ["--use-fused-rmsnorm"]),
    ("fused SwiGLU", [], ["--use-fused-swiglu"]),
)


def variants() -> list[tuple[str, list[str]]]:
    """(row name, trainer flags) of the baseline and of each row adding the next feature."""
    rows = []
    for on in range(len(FEATURES) + 1):
        flags = [flag for i, (_, off_flags, on_flags) in enumerate(FEATURES) for flag in
                 (on_flags if i < on else off_flags)]
        rows.append(("baseline" if on == 0 else f"+ {FEATURES[on - 1][0]}", flags))
    return rows


def train_steps(trainer_args: list[str], steps: int, warmup: int, threads: int) -> dict:
    """In this process, as ``mm-train trainer_args`` would: trains ``warmup + steps`` iterations; returns the
    timed steps' seconds and minor faults, the tokens per step and the last loss."""
    from mm_train.cli import parse_args
    from mm_train.config import build_config
    from mm_train.engines import build_engine
    from mm_train.features import allocator
    from mm_train.launch import init_process_group, read_launch
    from mm_train.platform.malloc import minor_faults

    torch.set_num_threads(threads)
    launch = read_launch()
    config = build_config(parse_args([*trainer_args, "--train-iters", str(warmup + steps)]), launch)
    allocator.apply(config.allocator)
    init_process_group(launch, config.parallel.distributed_backend, config.parallel.timeout)
    engine = build_engine(config, launch)
    seconds, faults, result = [], [], None
    try:
        data, _ = engine.data(engine.load())
        for step in range(warmup + steps):
            sync(launch.device)
            faults_before, start = minor_faults(), time.perf_counter()
            result = engine.train_step(data)
            sync(launch.device)
            if step >= warmup:
                seconds.append(time.perf_counter() - start)
                faults.append(minor_faults() - faults_before)
    finally:
        engine.close()
        torch.distributed.destroy_process_group()
    return {"seconds": seconds, "faults": faults, "tokens": result.tokens, "loss": result.loss}


def run_rounds(trainer_args: list[str], rounds: int, steps: int, warmup: int, threads: int) -> list[dict]:
    """Every variant once per round, each in a fresh process, the order reversed every other round; per
    variant: name, flags, medians, tokens/s, faults/step, loss and the paired speed-ups."""
    rows = variants()
    runs: dict[str, list[dict]] = {name: [] for name, _ in rows}
    for round_ in range(rounds):
        for name, flags in rows if round_ % 2 == 0 else reversed(rows):
            run = in_fresh_process(train_steps, [*trainer_args, *flags], steps, warmup, threads)
            runs[name].append(run)
            print(f"round {round_ + 1}/{rounds} {name}: {statistics.median(run['seconds']) * 1e3:.1f} ms/step",
                  file=sys.stderr, flush=True)
    per_round = {name: [statistics.median(run["seconds"]) for run in runs[name]] for name, _ in rows}
    baseline = per_round[rows[0][0]]
    results = []
    for index, (name, flags) in enumerate(rows):
        previous = per_round[rows[max(index - 1, 0)][0]]
        seconds = statistics.median(per_round[name])
        last = runs[name][-1]
        results.append({
            "variant": name, "flags": flags, "ms_per_step": seconds * 1e3, "tokens_per_s": last["tokens"] / seconds,
            "faults_per_step": statistics.median(f for run in runs[name] for f in run["faults"]),
            "loss": last["loss"], "round_ms": [s * 1e3 for s in per_round[name]],
            "speedup_vs_previous": statistics.median(p / s for p, s in zip(previous, per_round[name], strict=True)),
            "speedup_vs_baseline": statistics.median(b / s for b, s in zip(baseline, per_round[name], strict=True)),
        })
    return results


def format_rows(results: list[dict]) -> str:
    """Fixed-width table, one row per variant."""
    header = ["variant", "ms/step", "tokens/s", "minor faults/step", "last loss", "vs row above", "vs baseline"]
    rows = [[r["variant"], f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['faults_per_step']:.0f}",
             f"{r['loss']:.4f}", f"{r['speedup_vs_previous']:.2f}x", f"{r['speedup_vs_baseline']:.2f}x"]
            for r in results]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))) for row in [header, *rows])


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, extra trainer flags: whatever follows ``--``)."""
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="mm-bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_FLAGS))
    parser.add_argument("--rounds", type=at_least(1), default=3, help="runs of every variant, interleaved (default 3)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer, 64-wide model (smoke test)")
    add_step_arguments(parser, 5, "timed steps per run")
    return parser.parse_args(argv), extra


def check_trainer_args(trainer_args: list[str]) -> str | None:
    """The one-line error mm-train would stop with for any variant's flags, or None (argparse errors exit 2
    here, as in mm-train)."""
    from mm_train.cli import parse_args as parse_trainer_args
    from mm_train.config import build_config
    from mm_train.errors import ConfigError
    from mm_train.launch import read_launch

    for _, flags in variants():
        try:
            build_config(parse_trainer_args([*trainer_args, *flags]), read_launch())
        except ConfigError as error:
            return str(error)
    return None


def run_train_bench(argv: list[str]) -> int:
    """Entry point of ``mm-bench train``; returns the exit status."""
    args, extra = parse_args(argv)
    trainer_args = [*(QUICK_MODEL if args.quick else MODEL), *DTYPE_FLAGS[args.dtype], *extra]
    error = check_trainer_args(trainer_args)
    if error is not None:
        print(f"mm-bench train: error: {error}", file=sys.stderr)
        return 2
    results = run_rounds(trainer_args, args.rounds, args.steps, args.warmup, args.threads)
    print(format_rows(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trainer_args": trainer_args, "dtype": args.dtype, "rounds": args.rounds, "steps": args.steps,
                       "warmup": args.warmup, "threads": args.threads, "torch": torch.__version__,
                       "results": results}, f, indent=2)
    return 0
