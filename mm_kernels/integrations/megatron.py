"""Swaps megatron-core's RMSNorm, SwiGLU and MoE permute/unpermute for the mm_kernels ops (as MindSpeed does for NPU).

Public API for any megatron-core trainer::

    from mm_kernels.integrations.megatron import apply_fused_kernels
    apply_fused_kernels(rmsnorm=True, swiglu=True, moe_permute=True)   # before the model is built
    config = TransformerConfig(..., normalization="RMSNorm", gated_linear_unit=True,
                               activation_func=F.silu, bias_activation_fusion=True)

- ``rmsnorm``: every norm megatron-core builds through its torch-norm wrapper
  (``WrappedTorchNorm``: the local layer spec's input/pre-MLP norms and the final norm)
  becomes :class:`mm_kernels.nn.FusedRMSNorm` when ``config.normalization == "RMSNorm"``.
  Its weight is marked ``sequence_parallel`` so megatron all-reduces its gradient over TP
  under sequence parallelism. LayerNorm configs are left alone.
- ``swiglu``: megatron-core's fused SwiGLU entry point (``bias_swiglu_impl``, used by the
  dense MLP when ``bias_activation_fusion=True``) becomes :func:`mm_kernels.swiglu`
  (``chunk(2, dim=-1)`` convention, as megatron's). Without ``bias_activation_fusion`` the
  MLP runs megatron's reference ``silu(gate) * up``.
- ``moe_permute``: the token dispatchers' ``permute`` / ``unpermute`` (megatron-core's
  ``moe_utils`` functions, also imported by name into ``token_dispatcher``) become
  :data:`mm_kernels.ops.moe.megatron_permute` / ``megatron_unpermute`` (same signatures).
  Keep ``config.moe_permute_fusion = False``: megatron's own fusion needs Transformer Engine.

With both flags off nothing is patched and the reference implementations run.
:meth:`FusedKernelPatch.restore` (or leaving the ``with`` block) puts the originals back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _fused_norm_new(original_new):
    def new(cls, config, hidden_size, eps=1e-5, **kwargs):
        if config.normalization != "RMSNorm":
            return original_new(cls, config, hidden_size, eps, **kwargs)
        from mm_kernels.nn import FusedRMSNorm

        if config.layernorm_zero_centered_gamma:
            raise ValueError("FusedRMSNorm swap: layernorm_zero_centered_gamma is not supported")
        norm = FusedRMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm

    return new


def fused_bias_swiglu(input: torch.Tensor, bias: torch.Tensor | None, fp8_input_store: bool = False,
                      cpu_offload_input: bool = False) -> torch.Tensor:
    """Drop-in for megatron-core's ``bias_swiglu_impl``: x [..., 2F] (+ bias [2F]) -> [..., F].

    silu(first half) * second half via :func:`mm_kernels.swiglu`; the fp8/offload options of
    megatron's signature are not supported (ValueError when set).
    """
    from mm_kernels import swiglu

    if fp8_input_store or cpu_offload_input:
        raise ValueError("fused_bias_swiglu: fp8_input_store and cpu_offload_input are not supported")
    if bias is not None:
        input = input + bias
    return swiglu(input, dim=-1)


@dataclass
class FusedKernelPatch:
    """The patches :func:`apply_fused_kernels` installed; :meth:`restore` undoes them."""

    originals: list[tuple[object, str, object]] = field(default_factory=list)

    def set(self, owner: object, name: str, value: object) -> None:
        self.originals.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)))
        setattr(owner, name, value)

    def restore(self) -> None:
        """Puts back every patched attribute, newest first."""
        for owner, name, value in reversed(self.originals):
            setattr(owner, name, value)
        self.originals.clear()

    def __enter__(self) -> FusedKernelPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def apply_fused_kernels(rmsnorm: bool = False, swiglu: bool = False, moe_permute: bool = False) -> FusedKernelPatch:
    """Routes megatron-core's RMSNorm / SwiGLU / MoE permute to mm_kernels (see the module docstring).

    Call before the model is built. Returns the patch (a context manager) so it can be undone.
    """
    patch = FusedKernelPatch()
    if rmsnorm:
        from megatron.core.transformer import torch_norm

        original = torch_norm.WrappedTorchNorm.__dict__["__new__"]
        patch.set(torch_norm.WrappedTorchNorm, "__new__", _fused_norm_new(original))
    if swiglu:
        from megatron.core.transformer import mlp

        patch.set(mlp, "bias_swiglu_impl", fused_bias_swiglu)
    if moe_permute:
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        from mm_kernels.ops.moe import megatron_permute, megatron_unpermute

        for module in (moe_utils, token_dispatcher):
            patch.set(module, "permute", megatron_permute)
            patch.set(module, "unpermute", megatron_unpermute)
    return patch
