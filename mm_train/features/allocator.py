"""Host memory: ``--no-malloc-tuning`` and :class:`AllocatorConfig`.

By default mm-train tunes glibc malloc when it starts, before the model is built, so that training
steps reuse the memory earlier steps freed instead of mapping and faulting it in again every step
(:mod:`mm_train.platform.malloc`: why, and what it costs). ``--no-malloc-tuning`` keeps the C
library's defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mm_train.platform.malloc import tune_malloc


@dataclass(frozen=True)
class AllocatorConfig:
    """``malloc_tuning``: tune glibc malloc at start-up (:func:`apply`)."""

    malloc_tuning: bool = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --no-malloc-tuning."""
    group = parser.add_argument_group("host memory")
    group.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                       help="keep glibc malloc's defaults (by default freed memory is kept for the next step "
                            "instead of being returned to the system and faulted in again)")


def to_config(args: argparse.Namespace) -> AllocatorConfig:
    """The :class:`AllocatorConfig` of the flags."""
    return AllocatorConfig(malloc_tuning=args.malloc_tuning)


def apply(config: AllocatorConfig) -> bool:
    """Tunes malloc unless --no-malloc-tuning; True when it was tuned (glibc)."""
    return config.malloc_tuning and tune_malloc()
