"""Swaps megatron-core's RMSNorm, core attention, SwiGLU and MoE permute/unpermute for the mm_kernels ops
(as MindSpeed does for NPU).

Public API for any megatron-core trainer. The norm and the attention go in through the layer spec,
megatron-core's own seam, with no patching::

    from mm_kernels.integrations.megatron import (MegatronFlashAttention, MegatronFusedRMSNorm,
                                                  apply_fused_kernels, core_attention_spec, norm_block_spec)
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer = core_attention_spec(layer, MegatronFlashAttention)     # fused attention in every layer
    block = norm_block_spec(layer, config, MegatronFusedRMSNorm)   # every layer's norms and the final norm
    model = GPTModel(config, transformer_layer_spec=block, ...)
    apply_fused_kernels(swiglu=True, moe_permute=True)              # before the model is built

- ``MegatronFusedRMSNorm``: a norm module with megatron's norm constructor ``(config, hidden_size,
  eps)`` that builds :class:`mm_kernels.nn.FusedRMSNorm` (same parameter name and state dict as the
  torch RMSNorm it replaces). Its weight is marked ``sequence_parallel`` so megatron all-reduces its
  gradient over TP under sequence parallelism.
- ``MegatronFlashAttention`` (:mod:`mm_kernels.integrations.megatron_attention`): megatron's
  ``DotProductAttention`` (constructor, forward, masks, dropout under megatron's RNG tracker) on
  :func:`mm_kernels.ops.attention.flash_attention`; :func:`core_attention_spec` puts a core attention
  module into a layer spec.
- ``rmsnorm`` (:func:`apply_fused_kernels`): for trainers that cannot pass a spec, every norm
  megatron-core builds through its torch-norm wrapper (``WrappedTorchNorm``) becomes the fused one
  when ``config.normalization == "RMSNorm"``; LayerNorm configs are left alone.
- ``swiglu``: megatron-core's fused SwiGLU entry points (megatron has no spec seam for them), used
  when ``bias_activation_fusion=True``, become :func:`mm_kernels.swiglu` (``chunk(2, dim=-1)``
  convention, as megatron's): ``bias_swiglu_impl`` of the dense MLP and of the MoE shared experts,
  ``weighted_bias_swiglu_impl`` (the activation times each token's routing weight) of the MoE experts
  (``SequentialMLP`` experts and Transformer Engine's grouped experts), and the same weighted activation
  of the legacy ``GroupedMLP`` (``--moe-grouped-gemm``), set on each instance when it is built.
  Without ``bias_activation_fusion`` the MLP runs megatron's reference ``silu(gate) * up``.
- ``moe_permute``: the token dispatchers' ``permute`` / ``unpermute`` (megatron-core's
  ``moe_utils`` functions, also imported by name into ``token_dispatcher``) become
  :data:`mm_kernels.ops.moe.megatron_permute` / ``megatron_unpermute`` (same signatures).
  Keep ``config.moe_permute_fusion = False``: megatron's own fusion needs Transformer Engine.

With every flag off nothing is patched and the reference implementations run.
:meth:`FusedKernelPatch.restore` (or leaving the ``with`` block) puts the originals back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


def fused_rms_norm(config, hidden_size: int, eps: float = 1e-5) -> torch.nn.Module:
    """:class:`mm_kernels.nn.FusedRMSNorm` over ``hidden_size`` for megatron-core ``config`` (RMSNorm only)."""
    from mm_kernels.nn import FusedRMSNorm

    if config.normalization != "RMSNorm":
        raise ValueError(f"the fused RMSNorm needs config.normalization 'RMSNorm', got {config.normalization!r}")
    if config.layernorm_zero_centered_gamma:
        raise ValueError("the fused RMSNorm does not support layernorm_zero_centered_gamma")
    norm = FusedRMSNorm(hidden_size, eps=eps)
    norm.weight.sequence_parallel = config.sequence_parallel
    return norm


class MegatronFusedRMSNorm:
    """Layer-spec norm module: ``MegatronFusedRMSNorm(config, hidden_size, eps)`` returns a
    :class:`mm_kernels.nn.FusedRMSNorm` (see :func:`fused_rms_norm`), like megatron's WrappedTorchNorm
    returns a torch norm."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        return fused_rms_norm(config, hidden_size, eps)


def swap_spec_module(spec, old: type, new: type):
    """``spec`` (a ModuleSpec, submodules dataclass such as a block's TransformerBlockSubmodules, a list of
    them, or a module class) with every occurrence of the module class ``old`` replaced by ``new``, at any
    depth. The input is not modified."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is old:
        return new
    if isinstance(spec, (list, tuple)):
        return type(spec)(swap_spec_module(item, old, new) for item in spec)
    if isinstance(spec, ModuleSpec):
        module = new if spec.module is old else spec.module
        return dataclasses.replace(spec, module=module, submodules=swap_spec_module(spec.submodules, old, new))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: swap_spec_module(getattr(spec, f.name), old, new) for f in dataclasses.fields(spec) if f.init}
        return dataclasses.replace(spec, **changes)
    return spec


def core_attention_spec(layer_spec, module: type, params: dict | None = None):
    """``layer_spec`` (a TransformerLayer ModuleSpec with self-attention) with ``module`` (built with
    ``params`` besides megatron's arguments) as its core attention. The input is not modified."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    attention = layer_spec.submodules.self_attention
    core = ModuleSpec(module=module, params=params or {})
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules,
                                                                              core_attention=core))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules,
                                                                          self_attention=attention))


def norm_block_spec(layer_spec, config, norm: type, vp_stage: int | None = None, pp_rank: int | None = None):
    """A TransformerBlockSubmodules (pass it as GPTModel's ``transformer_layer_spec``) whose layers are
    ``layer_spec`` with its torch norms (megatron's WrappedTorchNorm) replaced by ``norm``, one per
    layer of this pipeline stage, and whose final norm is ``norm``."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = swap_spec_module(layer_spec, WrappedTorchNorm, norm)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage, pp_rank),
                                      layer_norm=norm)


def _fused_norm_new(original_new):
    def new(cls, config, hidden_size, eps=1e-5, **kwargs):
        if config.normalization != "RMSNorm":
            return original_new(cls, config, hidden_size, eps, **kwargs)
        return fused_rms_norm(config, hidden_size, eps)

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


def fused_weighted_bias_swiglu(input: torch.Tensor, bias: torch.Tensor | None, weights: torch.Tensor,
                               fp8_input_store: bool = False) -> torch.Tensor:
    """Drop-in for megatron-core's ``weighted_bias_swiglu_impl``: x [..., 2F] (+ bias [2F]) and per-token
    weights [..., 1] -> swiglu(x) * weights [..., F], in x's dtype (the product is formed in the
    weights' dtype, fp32 for routing probabilities, as megatron's does)."""
    from mm_kernels import swiglu

    if fp8_input_store:
        raise ValueError("fused_weighted_bias_swiglu: fp8_input_store is not supported")
    if bias is not None:
        input = input + bias
    return (swiglu(input, dim=-1) * weights).to(input.dtype)


def _fuse_grouped_mlp_activation(original_init):
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        config = self.config
        if config.gated_linear_unit and config.activation_func is torch.nn.functional.silu \
                and config.bias_activation_fusion:
            self.activation_func_with_probs = _GroupedActivation()

    return init


class _GroupedActivation:
    """GroupedMLP's ``activation_func_with_probs(x, probs)`` on :func:`fused_weighted_bias_swiglu`."""

    def __call__(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return fused_weighted_bias_swiglu(x, None, probs)


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
    A trainer that builds its own layer spec passes ``rmsnorm=False`` and uses :func:`norm_block_spec`.
    """
    patch = FusedKernelPatch()
    if rmsnorm:
        from megatron.core.transformer import torch_norm

        original = torch_norm.WrappedTorchNorm.__dict__["__new__"]
        patch.set(torch_norm.WrappedTorchNorm, "__new__", _fused_norm_new(original))
    if swiglu:
        from megatron.core.transformer import mlp
        from megatron.core.transformer.moe import experts, shared_experts

        patch.set(mlp, "bias_swiglu_impl", fused_bias_swiglu)
        patch.set(mlp, "weighted_bias_swiglu_impl", fused_weighted_bias_swiglu)
        patch.set(shared_experts, "bias_swiglu_impl", fused_bias_swiglu)
        patch.set(experts, "weighted_bias_swiglu_impl", fused_weighted_bias_swiglu)
        patch.set(experts.GroupedMLP, "__init__", _fuse_grouped_mlp_activation(experts.GroupedMLP.__init__))
    if moe_permute:
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        from mm_kernels.ops.moe import megatron_permute, megatron_unpermute

        for module in (moe_utils, token_dispatcher):
            patch.set(module, "permute", megatron_permute)
            patch.set(module, "unpermute", megatron_unpermute)
    return patch


def __getattr__(name: str):
    # MegatronFlashAttention subclasses megatron-core's MegatronModule: imported (with megatron) on first use.
    if name == "MegatronFlashAttention":
        from mm_kernels.integrations.megatron_attention import MegatronFlashAttention

        return MegatronFlashAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
