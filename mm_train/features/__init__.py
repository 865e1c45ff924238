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

from mm_train.errors import ConfigError


def flag(dest: str) -> str:
    """The command-line spelling of an argparse destination: ``seq_length`` -> ``--seq-length``."""
    return "--" + dest.replace("_", "-")


def fields_from(cls, args: argparse.Namespace, **values):
    """``cls(...)`` (a config dataclass) with every field not in ``values`` taken from the argparse
    attribute of the same name (KeyError names a field that has no flag)."""
    flags = vars(args)
    return cls(**{f.name: values[f.name] if f.name in values else flags[f.name] for f in dataclasses.fields(cls)})


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """ConfigError naming the first flag of ``names`` that is set and below 1."""
    for name in names:
        value = vars(args)[name]
        if value is not None and value < 1:
            raise ConfigError(f"{flag(name)} must be >= 1")
