"""``mm-bench vlm``: training steps of mm-train's multimodal path beside a plain transformers loop, on the
same vision-language model and the same batches, in one process.

A random Qwen2.5-VL of ``--size`` (``python -m mm_train.tiny_vlm``'s model and coloured-shapes data; ``small``:
4 text layers of width 512, 112-pixel images) trains for ``--steps`` steps two ways, their steps interleaved
(the order alternating every round) so that a busy machine slows both alike:

- ``mm-train``: the multimodal engine (FSDP2 on one rank, fused RMSNorm and SwiGLU, its data pipeline and
  loss), exactly as ``mm-train CONFIG.yaml`` runs it;
- ``transformers``: ``AutoModelForImageTextToText.from_pretrained`` of the same directory (eager PyTorch,
  default attention), ``torch.optim.AdamW`` with its defaults, the token-mean cross entropy of the logits
  (the loss mm-train computes) on the same micro-batches, with the attention mask and token type ids a
  processor gives.

The batches are loaded before timing (a DataLoader with workers hides that time in training). Reported:
the median time per step after warm-up, tokens/s (micro-batch x padded length), the last loss of each
(close, not equal: the fused kernels round differently), and the median over rounds of the ratio of
the two steps run back to back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from mm_kernels.bench.harness import add_step_arguments, at_least, sync
from mm_kernels.bench.hf_models import SIZES

VARIANTS = ("mm-train", "transformers")


def _run_config(root: Path, args: argparse.Namespace) -> Path:
    """A pretrain_transformers YAML for the demo under ``root`` with the benchmark's settings."""
    model, data = root / "model", root / "data"
    config = {
        "gpt_args": {"micro_batch_size": args.batch, "global_batch_size": args.batch, "seq_length": 128,
                     "train_iters": args.warmup + args.steps, "lr": 1e-4, "lr_decay_style": "constant",
                     "weight_decay": 0.0, "clip_grad": 0.0, "seed": 1, "num_workers": 0, "eval_iters": 0,
                     "use_fused_rmsnorm": True, "use_fused_swiglu": True, "bf16": args.dtype == "bf16"},
        "data": {"dataset_param": {
            "dataset_type": "huggingface",
            "preprocess_parameters": {"model_name_or_path": str(model), "image_min_pixels": 0,
                                      "image_max_pixels": 10**8},
            "basic_parameters": {"template": "qwen2vl", "dataset_dir": str(data), "dataset": str(data / "train.json")},
            "attr": {"images": "images", "messages": "messages", "role_tag": "role", "content_tag": "content",
                     "user_tag": "user", "assistant_tag": "assistant", "system_tag": None}}},
        "model": {"model_id": "qwen2_5vl", "init_from_hf_path": str(model),
                  "image_encoder": {"vision_encoder": {"freeze": False}}},
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _engine(path: Path, device: torch.device):
    from mm_train.cli import parse_args
    from mm_train.config import build_config
    from mm_train.engines import build_engine
    from mm_train.launch import Launch, init_process_group

    launch = Launch(0, 1, 0, device.type)
    config = build_config(parse_args([str(path)]), launch)
    init_process_group(launch, config.parallel.distributed_backend, config.parallel.timeout)
    engine = build_engine(config, launch)
    state = engine.load()
    return engine, engine.data(state)[0]


def _transformers_step(directory: Path, batches, device: torch.device, dtype: torch.dtype):
    """One step of a plain transformers loop on the next batch of ``batches``; returns (seconds, loss, tokens)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step() -> tuple[float, float, int]:
        batch = {key: value.to(device) for key, value in next(batches).items()}
        ids, labels = batch["input_ids"], batch["labels"]   # labels[t]: the target of input t
        sync(device)
        start = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=(ids == model.config.image_token_id).int()).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start, loss.item(), ids.numel()

    return step


def time_both(args: argparse.Namespace) -> dict[str, dict]:
    """Both variants in this process, steps interleaved: {variant: {ms_per_step, tokens_per_s, loss}} and the
    paired ratio."""
    from mm_train.tiny_vlm import build

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp) / "demo", args.size, train=args.batch * (args.warmup + args.steps), valid=1)
        engine, batches = _engine(_run_config(root, args), device)
        rounds = args.warmup + args.steps
        loaded = [next(batches) for _ in range(rounds)]   # both time their steps, not the data loading
        ours = iter(loaded)
        plain = _transformers_step(root / "model", iter(loaded), device, dtype)

        def our_step() -> tuple[float, float, int]:
            sync(device)
            start = time.perf_counter()
            result = engine.train_step(ours)
            sync(device)
            return time.perf_counter() - start, result.loss, result.tokens

        steppers = {"mm-train": our_step, "transformers": plain}
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        last: dict[str, tuple[float, int]] = {}
        try:
            for round_ in range(rounds):
                for variant in VARIANTS if round_ % 2 == 0 else reversed(VARIANTS):
                    seconds, loss, tokens = steppers[variant]()
                    last[variant] = (loss, tokens)
                    if round_ >= args.warmup:
                        times[variant].append(seconds)
        finally:
            engine.close()
            torch.distributed.destroy_process_group()
    paired = statistics.median(o / t for o, t in zip(times["mm-train"], times["transformers"], strict=True))
    results = {}
    for variant in VARIANTS:
        ms = statistics.median(times[variant]) * 1e3
        loss, tokens = last[variant]
        results[variant] = {"ms_per_step": ms, "tokens_per_s": tokens / ms * 1e3, "loss": loss}
    results["mm-train"]["ratio_to_transformers"] = paired
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mm-bench vlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=at_least(1), default=8, help="samples per step (default 8)")
    add_step_arguments(parser, 10, "timed steps per variant, interleaved")
    return parser.parse_args(argv)


def format_rows(results: dict[str, dict]) -> str:
    """Fixed-width table: one row per variant, then the mm-train / transformers ratios."""
    header = ["variant", "ms/step", "tokens/s", "loss"]
    rows = [[variant, f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['loss']:.4f}"]
            for variant, r in results.items()]
    ratio = results["mm-train"]["ratio_to_transformers"]
    rows.append(["mm-train/transformers", f"{ratio:.2f}x", f"{1 / ratio:.2f}x", ""])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows])


def run_vlm_bench(argv: list[str]) -> int:
    """Entry point of ``mm-bench vlm``; returns the exit status."""
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("mm-bench vlm: transformers is not installed (pip install 'mm-kernels[hf]')", file=sys.stderr)
        return 2
    results = time_both(args)
    print(format_rows(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "size": args.size, "batch": args.batch,
                       "threads": args.threads, "torch": torch.__version__, "results": results}, f, indent=2)
    return 0
