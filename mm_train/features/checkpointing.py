"""Checkpoints: ``--save``/``--load``, ``--save-interval``, ``--ckpt-format torch|torch_dist|torch_dcp``,
what is saved and loaded (``--no-save-optim``, ``--no-load-rng``, ``--finetune``, ...), their checks,
:class:`CheckpointConfig`, and the run as Megatron-LM's ``args`` Namespace (:func:`megatron_args`, what
a Megatron checkpoint carries). The formats live in :mod:`mm_train.checkpoint`; the engine picks its own."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import positive_int


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and what to save and load. ``save`` set enables saving (every ``save_interval``
    iterations, and at the end); ``finetune`` loads the weights only and starts at iteration 0.
    ``ckpt_format``: torch (Megatron-LM's files), torch_dist (megatron-core's dist_checkpointing: loads
    at another TP/PP/DP), torch_dcp (FSDP2)."""

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    ckpt_format: str = "torch"
    save_optim: bool = True
    save_rng: bool = True
    load_optim: bool = True
    load_rng: bool = True
    finetune: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the checkpoint flags."""
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--save", default=None, help="checkpoint directory; setting it enables saving")
    group.add_argument("--load", default=None)
    group.add_argument("--save-interval", type=positive_int, default=None)
    group.add_argument("--ckpt-format", default="torch", choices=["torch", "torch_dist", "torch_dcp"],
                       help="torch: Megatron-LM's files; torch_dist: megatron-core's sharded checkpoint (loads at "
                            "another TP/PP/DP); torch_dcp: with --use-torch-fsdp2")
    group.add_argument("--no-save-optim", action="store_true")
    group.add_argument("--no-save-rng", action="store_true")
    group.add_argument("--no-load-optim", action="store_true")
    group.add_argument("--no-load-rng", action="store_true")
    group.add_argument("--finetune", action="store_true", help="load weights only, start at iteration 0")


def check(args: argparse.Namespace) -> None:
    """torch_dcp is FSDP2's format (FSDP2 refuses the other formats itself)."""
    if args.ckpt_format == "torch_dcp" and not args.use_torch_fsdp2:
        raise ConfigError("--ckpt-format torch_dcp needs --use-torch-fsdp2 (Megatron's optimizer saves with "
                          "--ckpt-format torch or torch_dist)")


# Config fields saved under another name in Megatron's args: (section, field) -> Megatron's name.
_MEGATRON_NAMES = {
    ("context_parallel", "size"): "context_parallel_size",
    ("context_parallel", "algo"): "context_parallel_algo",
    ("context_parallel", "ulysses_degree"): "ulysses_degree_in_cp",
    ("fused_kernels", "rmsnorm"): "use_fused_rmsnorm",
    ("fused_kernels", "swiglu"): "use_fused_swiglu",
    ("data", "data_paths"): "data_path",
}


def megatron_args(record: dict, **values) -> argparse.Namespace:
    """The run as Megatron-LM's ``args``: every field of the configuration ``record`` (RunConfig.record(),
    plain values) under its Megatron name, the attributes Megatron-LM's checkpoint loader reads, then
    ``values`` (e.g. consumed_train_samples, padded_vocab_size). Loadable with weights_only once
    argparse.Namespace is an allowed global (megatron-core allows it)."""
    flat: dict = {}
    for section, fields in record.items():
        if not isinstance(fields, dict):
            continue
        for key, value in fields.items():
            if isinstance(value, dict):
                for inner, item in value.items():
                    flat.setdefault(inner, item)
            else:
                flat.setdefault(_MEGATRON_NAMES.get((section, key), key), value)
    flat["num_experts"] = (record.get("moe") or {}).get("num_experts")
    flat["add_position_embedding"] = flat.get("position_embedding_type") == "learned_absolute"
    flat.update(skipped_train_samples=0, consumed_valid_samples=0, **values)
    return argparse.Namespace(**flat)


def to_config(args: argparse.Namespace) -> CheckpointConfig:
    """The :class:`CheckpointConfig` of the (checked) flags."""
    return CheckpointConfig(save=args.save, load=args.load, save_interval=args.save_interval,
                            ckpt_format=args.ckpt_format, save_optim=not args.no_save_optim,
                            save_rng=not args.no_save_rng, load_optim=not args.no_load_optim,
                            load_rng=not args.no_load_rng, finetune=args.finetune)
