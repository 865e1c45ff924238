"""mm_kernels.integrations.megatron: the norm and SwiGLU swaps happen only when asked, and undo; the norm
also goes in through the layer spec."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig, mlp, torch_norm

from mm_kernels.integrations.megatron import apply_fused_kernels, fused_bias_swiglu
from tests.helpers import assert_close


def _config(normalization="RMSNorm"):
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization=normalization)


def test_off_builds_the_reference_norm_and_swiglu():
    with apply_fused_kernels(rmsnorm=False, swiglu=False):
        norm = torch_norm.WrappedTorchNorm(_config(), 8)
        assert type(norm) is torch.nn.RMSNorm
        assert mlp.bias_swiglu_impl is not fused_bias_swiglu


def test_swiglu_swap_and_restore():
    original = mlp.bias_swiglu_impl
    with apply_fused_kernels(swiglu=True):
        assert mlp.bias_swiglu_impl is fused_bias_swiglu
    assert mlp.bias_swiglu_impl is original


def test_norm_swap_restores_the_wrapper():
    original = torch_norm.WrappedTorchNorm.__dict__["__new__"]
    with apply_fused_kernels(rmsnorm=True):
        assert torch_norm.WrappedTorchNorm.__dict__["__new__"] is not original
        layer_norm = torch_norm.WrappedTorchNorm(_config(normalization="LayerNorm"), 8)
        assert type(layer_norm) is torch.nn.LayerNorm
    assert torch_norm.WrappedTorchNorm.__dict__["__new__"] is original


def test_fused_norm_is_built_and_matches_torch():
    from mm_kernels.nn import FusedRMSNorm

    with apply_fused_kernels(rmsnorm=True):
        norm = torch_norm.WrappedTorchNorm(_config(), 8, eps=1e-5)
    assert isinstance(norm, FusedRMSNorm)
    assert norm.weight.sequence_parallel is False
    x = torch.randn(3, 5, 8)
    assert_close(norm(x), torch.nn.functional.rms_norm(x, (8,), norm.weight, 1e-5), torch.float32)


def test_fused_swiglu_matches_megatron_glu():
    x = torch.randn(4, 3, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64)
    gate, up = torch.chunk(x + bias, 2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert_close(fused_bias_swiglu(x.float(), bias.float()), expected, torch.float32)


def test_spec_swap_puts_the_fused_norm_in_every_layer_norm_slot():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from mm_kernels.integrations.megatron import MegatronFusedRMSNorm, swap_spec_module
    from mm_kernels.nn import FusedRMSNorm

    local = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True)
    fused = swap_spec_module(local, torch_norm.WrappedTorchNorm, MegatronFusedRMSNorm)
    attention = fused.submodules.self_attention.submodules
    slots = (fused.submodules.input_layernorm, fused.submodules.pre_mlp_layernorm, attention.q_layernorm,
             attention.k_layernorm)
    assert all(slot is MegatronFusedRMSNorm for slot in slots)
    assert local.submodules.input_layernorm is torch_norm.WrappedTorchNorm  # the original spec is unchanged
    norm = MegatronFusedRMSNorm(_config(), 8, eps=1e-5)
    assert isinstance(norm, FusedRMSNorm) and norm.weight.sequence_parallel is False
