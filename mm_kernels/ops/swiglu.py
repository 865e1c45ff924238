"""SwiGLU: public API and the ``mm_kernels::swiglu_*`` operators (outputs always contiguous).

``swiglu(x, dim)`` = silu(a) * b with a, b = x.chunk(2, dim) (the Megatron / torch_npu.npu_swiglu
convention); ``swiglu_pair(gate, up)`` = silu(gate) * up. silu is computed in fp32 (fp64 for
fp64 inputs) and the result rounded once to the input dtype. Only the input is saved for
backward: the backward recomputes silu instead of keeping it.
"""

import torch
from torch import Tensor

from mm_kernels import contract
from mm_kernels.ops._checks import check_float, check_same_device
from mm_kernels.ops._kernel_op import KernelOp

swiglu_fwd = KernelOp(contract.SwiGLU, "swiglu_fwd")
swiglu_bwd = KernelOp(contract.SwiGLU, "swiglu_bwd")
swiglu_pair_fwd = KernelOp(contract.SwiGLU, "swiglu_pair_fwd")
swiglu_pair_bwd = KernelOp(contract.SwiGLU, "swiglu_pair_bwd")


@swiglu_fwd.register_fake
def _(x, dim):
    shape = list(x.shape)
    shape[dim] //= 2
    return x.new_empty(shape)


@swiglu_bwd.register_fake
def _(dy, x, dim):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, dim = inputs
    ctx.save_for_backward(x)
    ctx.dim = dim


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return swiglu_bwd.run(ctx.backend, dy.contiguous(), x, ctx.dim), None


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


@swiglu_pair_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@swiglu_pair_bwd.register_fake
def _(dy, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _pair_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _pair_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return swiglu_pair_bwd.run(ctx.backend, dy.contiguous(), gate, up)


swiglu_pair_fwd.register_autograd(_pair_backward, setup_context=_pair_setup_context)


def _split_dim(x: Tensor, dim: object) -> int:
    """``dim`` as an index in [0, x.dim()); raises unless x.size(dim) splits into two halves."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
    dim %= x.dim()
    if x.shape[dim] % 2:
        raise ValueError(f"x.size({dim}) must be even to split into gate and up halves along dim {dim}, "
                         f"got {x.shape[dim]} (x of shape {tuple(x.shape)})")
    return dim


def swiglu(x: Tensor, dim: int = -1) -> Tensor:
    """SwiGLU of the two halves of x along ``dim``: silu(a) * b with a, b = x.chunk(2, dim).

    x [..., 2F, ...] fp32/fp16/bf16/fp64 (2F at ``dim``, any dim, negative too) -> y [..., F, ...] in x.dtype.
    """
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (shape [..., 2F, ...]), got a 0-d tensor")
    return swiglu_fwd(x, _split_dim(x, dim))


def swiglu_pair(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: gate, up [...] same shape, dtype and device (fp32/fp16/bf16/fp64) -> [...] in gate.dtype."""
    check_float("gate", gate)
    check_float("up", up)
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(f"up must match gate: shape {tuple(gate.shape)} dtype {gate.dtype}, "
                         f"got {tuple(up.shape)} {up.dtype}")
    check_same_device(gate=gate, up=up)
    return swiglu_pair_fwd(gate, up)
