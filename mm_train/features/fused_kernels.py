"""The fused kernels: ``--use-flash-attn``, ``--use-fused-rmsnorm`` and ``--use-fused-swiglu``
(``--moe-permute-fusion`` is a MoE flag, applied here too), their checks, :class:`FusedKernelsConfig`,
and how they reach megatron-core through :mod:`mm_kernels.integrations.megatron`:

- attention through the layer spec (:func:`attention_layer_spec`): with --use-flash-attn every
  layer's core attention is :class:`~mm_kernels.integrations.megatron_attention.MegatronFlashAttention`
  (mm_kernels' fused attention: ATen's flash attention on CPU, Triton on CUDA, npu_fusion_attention
  on Ascend); with context parallelism the context-parallel attention, which runs the same kernels,
  takes its place whatever the flag. Attention dropout is fused only in the Triton kernel: on CPU
  and Ascend, --use-flash-attn with --attention-dropout > 0 leaves megatron-core's attention in place
  (one start-up line says so);
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

from megatron.core.transformer.spec_utils import ModuleSpec

from mm_kernels.integrations.megatron import (
    FusedKernelPatch,
    MegatronFusedRMSNorm,
    apply_fused_kernels,
    core_attention_spec,
)
from mm_kernels.integrations.megatron_attention import MegatronFlashAttention
from mm_train.errors import ConfigError
from mm_train.features.model import uses_transformer_engine
from mm_train.features.moe import MoEConfig


@dataclass(frozen=True)
class FusedKernelsConfig:
    """Which megatron-core ops run on mm_kernels (MoE permute: ``MoEConfig.moe_permute_fusion``)."""

    flash_attn: bool = False
    rmsnorm: bool = False
    swiglu: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --use-flash-attn, --use-fused-rmsnorm and --use-fused-swiglu."""
    group = parser.add_argument_group("fused kernels")
    group.add_argument("--use-flash-attn", action="store_true",
                       help="fused attention (no [b, heads, s, s] scores); dropout fused on CUDA only")
    group.add_argument("--use-fused-rmsnorm", action="store_true")
    group.add_argument("--use-fused-swiglu", action="store_true")


# Devices whose attention kernel has no dropout: why.
_NO_FUSED_DROPOUT = {
    "cpu": "ATen's CPU flash attention has no dropout",
    "npu": "npu_fusion_attention draws its own dropout mask, which mm_kernels' attention cannot replay",
}


def check(args: argparse.Namespace) -> None:
    """A fused kernel needs the op it replaces in the model."""
    if args.use_fused_rmsnorm and args.normalization != "RMSNorm":
        raise ConfigError("--use-fused-rmsnorm needs --normalization RMSNorm")
    if args.use_fused_swiglu and not args.swiglu:
        raise ConfigError("--use-fused-swiglu needs --swiglu")


def _unfused_attention_reason(args: argparse.Namespace, device_type: str) -> str | None:
    """Why --use-flash-attn leaves megatron-core's attention in place; None when the fused one goes in."""
    if not args.use_flash_attn:
        return None
    if uses_transformer_engine(args):
        return ("Transformer Engine's fused attention runs (--transformer-impl transformer_engine); mm_kernels' goes "
                "in with --transformer-impl local")
    if args.attention_dropout > 0 and device_type in _NO_FUSED_DROPOUT:
        return (f"megatron-core's attention runs, for --attention-dropout {args.attention_dropout} on {device_type} "
                f"({_NO_FUSED_DROPOUT[device_type]}); --attention-dropout 0 lets the fused attention in")
    return None


def notices(args: argparse.Namespace, device_type: str) -> list[str]:
    """Which fused kernel asked for does not go in, and why: with Transformer Engine's layer spec its own
    fused RMSNorm (inside its fused linear layers) and attention run; the fused attention's dropout needs
    CUDA."""
    lines = []
    if args.use_fused_rmsnorm and uses_transformer_engine(args):
        lines.append("--use-fused-rmsnorm: Transformer Engine's fused RMSNorm runs (--transformer-impl "
                     "transformer_engine fuses the norms into its linear layers); mm_kernels' norm goes in with "
                     "--transformer-impl local")
    reason = _unfused_attention_reason(args, device_type)
    if reason is not None:
        lines.append(f"--use-flash-attn: {reason}")
    return lines


def to_config(args: argparse.Namespace, device_type: str) -> FusedKernelsConfig:
    """The :class:`FusedKernelsConfig` of the (checked) flags on ``device_type``: attention and norm stay
    Transformer Engine's with its spec, attention with dropout stays megatron-core's off CUDA."""
    te = uses_transformer_engine(args)
    flash = args.use_flash_attn and _unfused_attention_reason(args, device_type) is None
    return FusedKernelsConfig(flash_attn=flash, rmsnorm=args.use_fused_rmsnorm and not te,
                              swiglu=args.use_fused_swiglu)


def attention_layer_spec(spec: ModuleSpec, kernels: FusedKernelsConfig) -> ModuleSpec:
    """``spec`` (a TransformerLayer spec) with the fused core attention under --use-flash-attn, else itself."""
    return core_attention_spec(spec, MegatronFlashAttention) if kernels.flash_attn else spec


def norm_module(kernels: FusedKernelsConfig) -> type | None:
    """The norm module class for megatron-core's local layer spec with --use-fused-rmsnorm; None (keep the
    trainer's torch norm) without it."""
    return MegatronFusedRMSNorm if kernels.rmsnorm else None


def apply(kernels: FusedKernelsConfig, moe: MoEConfig | None) -> FusedKernelPatch:
    """Routes megatron-core's SwiGLU and MoE permute/unpermute functions to mm_kernels as the flags ask
    (before the model is built); returns the patch."""
    return apply_fused_kernels(swiglu=kernels.swiglu, moe_permute=moe is not None and moe.moe_permute_fusion)
