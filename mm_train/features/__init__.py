"""The trainer's features, one module each, with no registry.

A feature module owns, in one file:

- ``add_arguments(parser)``: its flags, with Megatron's / MindSpeed-MM's names and defaults;
- ``fill_defaults(args, ...)`` where a default depends on other flags (e.g. the FFN width);
- ``check(args, ...)``: its checks, alone and against the flags of other features, each failure a
  one-line :class:`mm_train.errors.ConfigError`;
- ``to_config(args, ...)``: its frozen config dataclass;
- what it applies to the run, as functions of that dataclass.

:mod:`mm_train.cli` assembles the parser from the ``add_arguments`` functions and
:func:`mm_train.config.build_config` calls ``fill_defaults``, ``check`` and ``to_config`` in order.
These functions are the only ones in the trainer that read the argparse Namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import math


def flag(dest: str) -> str:
    """The command-line spelling of an argparse destination: ``seq_length`` -> ``--seq-length``."""
    return "--" + dest.replace("_", "-")


def fields_from(cls, args: argparse.Namespace, **values):
    """``cls(...)`` (a config dataclass) with every field not in ``values`` taken from the argparse
    attribute of the same name (KeyError names a field that has no flag)."""
    flags = vars(args)
    return cls(**{f.name: values[f.name] if f.name in values else flags[f.name] for f in dataclasses.fields(cls)})


def ranged(kind: type, low: float | None = None, high: float | None = None, *, above: bool = False,
           below: bool = False):
    """An argparse ``type``: ``kind`` (int or float) in [low, high], open at ``low`` when ``above`` and at
    ``high`` when ``below`` (None: unbounded). A value outside is argparse's one-line error (exit 2)
    naming the flag, e.g. ``argument --hidden-size: must be an integer >= 1, got '0'``."""
    noun = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        wanted = f"{noun} in {'(' if above else '['}{low}, {high}{')' if below else ']'}"
    elif low is not None:
        wanted = f"{noun} {'>' if above else '>='} {low}"
    else:
        wanted = f"{noun} {'<' if below else '<='} {high}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        inside = math.isfinite(value) and (
            low is None or (value > low if above else value >= low)) and (
            high is None or (value < high if below else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted
    return parse


# The ranges of the trainer's numeric flags.
positive_int = ranged(int, 1)
non_negative_int = ranged(int, 0)
positive = ranged(float, 0, above=True)
non_negative = ranged(float, 0)
probability_below_one = ranged(float, 0, 1, below=True)
