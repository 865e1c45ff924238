"""Flags of MindSpeed-MM launch scripts that this trainer accepts without effect (listed once at
start-up) or parses and refuses as not yet supported."""

from __future__ import annotations

import argparse

from mm_train.errors import ConfigError
from mm_train.features import flag, positive_int

# Accepted so that MindSpeed-MM scripts run; no effect on this trainer.
INACTIVE_FLAGS = (
    "use_mcore_models",
    "no_gradient_accumulation_fusion",
    "no_masked_softmax_fusion",
    "no_bias_dropout_fusion",
    "no_bias_swiglu_fusion",
    "no_rope_fusion",
    "attention_softmax_in_fp32",
    "use_flash_attn",
    "use_fused_rotary_pos_emb",
    "reuse_fp32_param",
    "enable_one_logger",
    "log_throughput",
)

# Parsed, then refused: (destination, value meaning "not given").
SCALE_OUT_FLAGS = (
    ("num_layers_per_virtual_pipeline_stage", None),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the inactive flags and the not-yet-supported ones."""
    inactive = parser.add_argument_group("accepted for compatibility (no effect here)")
    for name in INACTIVE_FLAGS:
        inactive.add_argument(flag(name), action="store_true")
    scale_out = parser.add_argument_group("scale-out features (parsed, not yet supported)")
    scale_out.add_argument("--num-layers-per-virtual-pipeline-stage", type=positive_int, default=None)


def check(args: argparse.Namespace) -> None:
    """Refuses a flag of a feature this trainer does not have yet."""
    for name, off in SCALE_OUT_FLAGS:
        if vars(args)[name] != off:
            raise ConfigError(f"{flag(name)} is not yet supported by mm-train")


def inactive_flags_used(args: argparse.Namespace) -> tuple[str, ...]:
    """The inactive flags on the command line, spelled as flags (for the start-up notice)."""
    return tuple(flag(name) for name in INACTIVE_FLAGS if vars(args)[name])
