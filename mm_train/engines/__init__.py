"""Engines: how a model is wrapped, stepped, evaluated and saved (the interface: :mod:`mm_train.engines.base`).

- :class:`~mm_train.engines.megatron.MegatronEngine`: megatron-core DDP / distributed optimizer, torch checkpoints;
- :class:`~mm_train.engines.fsdp2.FSDP2Engine`: ``--use-torch-fsdp2``, torch_dcp checkpoints;
- :class:`~mm_train.engines.hf.HFEngine`: a Hugging Face vision-language model on FSDP2
  (``--mm-model``/``--mm-data`` or a ``pretrain_transformers`` YAML), torch_dcp checkpoints.

The first two train megatron-core's GPT model (:mod:`mm_train.engines.gpt`). :func:`build_engine` is
the one place that picks an engine for a run.
"""

from __future__ import annotations

from mm_train.config import RunConfig
from mm_train.engines.base import Engine, StepResult
from mm_train.engines.fsdp2 import FSDP2Engine
from mm_train.engines.hf import HFEngine
from mm_train.engines.megatron import MegatronEngine
from mm_train.launch import Launch

__all__ = ["Engine", "StepResult", "build_engine"]


def build_engine(config: RunConfig, launch: Launch) -> Engine:
    """The engine of ``config``, built on this rank (collective; the process group must exist)."""
    if config.multimodal is not None:
        return HFEngine(config, launch)
    if config.fsdp2 is not None:
        return FSDP2Engine(config, launch)
    return MegatronEngine(config, launch)
