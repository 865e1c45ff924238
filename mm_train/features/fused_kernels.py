"""The fused kernels: ``--use-fused-rmsnorm`` and ``--use-fused-swiglu`` (``--moe-permute-fusion`` is a
MoE flag, applied here too), their checks, :class:`FusedKernelsConfig`, and how they reach
megatron-core through :mod:`mm_kernels.integrations.megatron`:

- RMSNorm through the layer spec (megatron-core's seam; :func:`norm_module`), for every layer's norms
  and the final norm;
- SwiGLU (megatron-core's fused entry points, used with ``bias_activation_fusion``: dense and shared-expert
  MLPs, and the probability-weighted activation of the MoE experts) and MoE permute/unpermute by
  replacing megatron-core's functions (:func:`apply`), as megatron-core has no spec seam for them.

Off, megatron-core's reference implementations run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mm_kernels.integrations.megatron import FusedKernelPatch, MegatronFusedRMSNorm, apply_fused_kernels
from mm_train.errors import ConfigError
from mm_train.features.model import uses_transformer_engine
from mm_train.features.moe import MoEConfig


@dataclass(frozen=True)
class FusedKernelsConfig:
    """Which megatron-core ops run on mm_kernels (MoE permute: ``MoEConfig.moe_permute_fusion``)."""

    rmsnorm: bool = False
    swiglu: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --use-fused-rmsnorm and --use-fused-swiglu."""
    group = parser.add_argument_group("fused kernels")
    group.add_argument("--use-fused-rmsnorm", action="store_true")
    group.add_argument("--use-fused-swiglu", action="store_true")


def check(args: argparse.Namespace) -> None:
    """A fused kernel needs the op it replaces in the model."""
    if args.use_fused_rmsnorm and args.normalization != "RMSNorm":
        raise ConfigError("--use-fused-rmsnorm needs --normalization RMSNorm")
    if args.use_fused_swiglu and not args.swiglu:
        raise ConfigError("--use-fused-swiglu needs --swiglu")


def notices(args: argparse.Namespace) -> list[str]:
    """With Transformer Engine's layer spec, its own fused RMSNorm (inside its fused linear layers) runs."""
    if args.use_fused_rmsnorm and uses_transformer_engine(args):
        return ["--use-fused-rmsnorm: Transformer Engine's fused RMSNorm runs (--transformer-impl transformer_engine "
                "fuses the norms into its linear layers); mm_kernels' norm goes in with --transformer-impl local"]
    return []


def to_config(args: argparse.Namespace) -> FusedKernelsConfig:
    """The :class:`FusedKernelsConfig` of the (checked) flags; the norm stays Transformer Engine's with its spec."""
    return FusedKernelsConfig(rmsnorm=args.use_fused_rmsnorm and not uses_transformer_engine(args),
                              swiglu=args.use_fused_swiglu)


def norm_module(kernels: FusedKernelsConfig) -> type | None:
    """The norm module class for megatron-core's local layer spec with --use-fused-rmsnorm; None (keep the
    trainer's torch norm) without it."""
    return MegatronFusedRMSNorm if kernels.rmsnorm else None


def apply(kernels: FusedKernelsConfig, moe: MoEConfig | None) -> FusedKernelPatch:
    """Routes megatron-core's SwiGLU and MoE permute/unpermute functions to mm_kernels as the flags ask
    (before the model is built); returns the patch."""
    return apply_fused_kernels(swiglu=kernels.swiglu, moe_permute=moe is not None and moe.moe_permute_fusion)
