"""megatron-core's import-time warnings that a user cannot act on, summarised in one line.

Without Transformer Engine and Apex, megatron-core warns once per module that falls back to its
PyTorch implementations (six warnings at start-up), its TransformerConfig warns about a deprecated
default it sets itself, and torch warns that megatron-core calls collectives by deprecated names. :func:`silence_fallback_warnings` hides them (it runs when
``mm_train`` is imported, before megatron-core is); :func:`fallback_notice` is the one line that
says the same.
"""

from __future__ import annotations

import importlib.util
import warnings

_NOISE = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    r"`torch\.distributed\.\w+` is deprecated",  # collectives megatron-core calls by their older names
)


def silence_fallback_warnings() -> None:
    """Ignores megatron-core's fallback and deprecated-default warnings in this process."""
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)


def missing_accelerated_packages() -> list[str]:
    """The optional NVIDIA packages megatron-core would use that are not installed (names to print)."""
    names = {"transformer_engine": "Transformer Engine", "apex": "Apex"}
    return [label for module, label in names.items() if importlib.util.find_spec(module) is None]


def fallback_notice() -> list[str]:
    """The start-up line saying megatron-core runs its PyTorch implementations; none when both packages exist."""
    missing = missing_accelerated_packages()
    if not missing:
        return []
    verb = "is" if len(missing) == 1 else "are"
    return [f"{' and '.join(missing)} {verb} not installed: megatron-core runs its PyTorch implementations"]
