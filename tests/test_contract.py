"""The kernel contract: every backend module implements every declared kernel, and every operator passes
torch.library.opcheck (schema, fake implementation, autograd registration, AOT dispatch) in both overloads."""

from __future__ import annotations

import importlib
import inspect
import sys
import types

import pytest
import torch

import mm_kernels
from mm_kernels import contract
from mm_kernels.ops import attention as attention_ops
from mm_kernels.ops import moe as moe_ops
from mm_kernels.ops import rms_norm as rms_norm_ops
from mm_kernels.ops import swiglu as swiglu_ops
from mm_kernels.ops._kernel_op import KernelOp
from mm_kernels.reference import moe as moe_reference
from tests.helpers import triton_available


def _parameter_names(fn) -> list[str]:
    """Parameter names of a Python function, or of a torch operator (from its schema)."""
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return [arg.name for arg in fn.default._schema.arguments]
    return list(inspect.signature(fn).parameters)


def _backend_module(backend: str, family: type[contract.Family], monkeypatch) -> types.ModuleType:
    if backend == "cpu" and not mm_kernels.backends()["cpu"]:
        pytest.skip("the C++ extension is not built")
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    name = f"mm_kernels.{backend}.{family.module}"
    if backend == "npu" and "torch_npu" not in sys.modules:
        # The NPU modules only call torch_npu; a stand-in lets them import to be inspected.
        monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(name)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "npu"])
@pytest.mark.parametrize("family", contract.FAMILIES, ids=lambda f: f.__name__)
def test_every_backend_implements_its_family(backend, family, monkeypatch):
    module = _backend_module(backend, family, monkeypatch)
    for name, declaration in family.kernels().items():
        assert hasattr(module, name), f"{module.__name__} lacks {name}"
        assert _parameter_names(getattr(module, name)) == list(inspect.signature(declaration).parameters), \
            f"{module.__name__}.{name}: parameters differ from contract.{family.__name__}.{name}"


def test_every_declared_kernel_is_an_operator():
    ops = {op.qualname for module in (rms_norm_ops, swiglu_ops, moe_ops, attention_ops)
           for op in vars(module).values() if isinstance(op, KernelOp)}
    declared = {f"mm_kernels::{family.prefix}{name}" for family in contract.FAMILIES for name in family.kernels()}
    assert ops == declared
    assert len(declared) == 16


def _grad(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _samples() -> list[tuple[KernelOp, tuple]]:
    """(operator, arguments) covering every operator; the inputs of differentiable ones require grad."""
    torch.manual_seed(0)
    x, w, dy = torch.randn(4, 8), torch.rand(8) + 0.5, torch.randn(4, 8)
    rstd = rms_norm_ops.rms_norm_fwd(x, w, 1e-6, "llama", 0.0)[1]
    tokens = torch.randn(6, 4)
    indices = torch.tensor([[0, 2], [1, 3], [2, 0], [3, 1], [0, 1], [2, 3]])
    permuted, sorted_indices = moe_reference.permute_fwd(tokens, indices, 12, 4)
    probs = torch.rand(6, 2)
    row_token = torch.tensor([0, 2, 2, 5, 1, 4, 3, 0, 5])
    routing_map = torch.rand(6, 4) > 0.5
    q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 7, 1, 4), torch.randn(1, 7, 1, 4)
    out, lse = attention_ops.attention_fwd(q, k, v, True, 0.5)
    return [
        (rms_norm_ops.rms_norm_fwd, (_grad(4, 8), _grad(8), 1e-6, "llama", 0.0)),
        (rms_norm_ops.rms_norm_fwd, (_grad(3, 5, dtype=torch.bfloat16), None, 1e-5, "gemma", 1.0)),
        (rms_norm_ops.rms_norm_bwd, (dy, x, w, rstd, 1e-6, "llama", 0.0)),
        (rms_norm_ops.add_rms_norm_fwd, (_grad(4, 8), _grad(4, 8), _grad(8), 1e-6)),
        (swiglu_ops.swiglu_fwd, (_grad(3, 8, 5), 1)),
        (swiglu_ops.swiglu_bwd, (torch.randn(3, 4, 5), torch.randn(3, 8, 5), 1)),
        (swiglu_ops.swiglu_pair_fwd, (_grad(6, 5), _grad(6, 5))),
        (swiglu_ops.swiglu_pair_bwd, (torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5))),
        (moe_ops.moe_permute_fwd, (tokens.clone().requires_grad_(), indices, 10, 4)),
        (moe_ops.moe_unpermute_fwd, (permuted.clone().requires_grad_(), sorted_indices,
                                     probs.clone().requires_grad_(), 6)),
        (moe_ops.moe_unpermute_bwd, (torch.randn(6, 4), permuted, sorted_indices, probs)),
        (moe_ops.moe_sort_routing_map, (routing_map, 3)),
        (moe_ops.moe_gather, (tokens.clone().requires_grad_(), row_token)),
        (moe_ops.moe_combine, (_grad(9, 4), row_token, _grad(9), 6)),
        (moe_ops.moe_combine_bwd, (torch.randn(6, 4), torch.randn(9, 4), row_token, torch.rand(9))),
        (attention_ops.attention_fwd, (q.clone().requires_grad_(), k.clone().requires_grad_(),
                                       v.clone().requires_grad_(), True, 0.5)),
        (attention_ops.attention_bwd, (torch.randn(1, 5, 2, 4), q, k, v, out, lse, True, 0.5)),
    ]


SAMPLES = _samples()


def test_samples_cover_every_operator():
    assert {op.qualname for op, _ in SAMPLES} == {f"mm_kernels::{f.prefix}{n}" for f in contract.FAMILIES
                                                   for n in f.kernels()}


@pytest.mark.parametrize("op, args", SAMPLES, ids=[f"{op.qualname.split('::')[1]}-{i}" for i, (op, _) in
                                                   enumerate(SAMPLES)])
def test_default_overload_passes_opcheck(op, args):
    torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("op, args", SAMPLES, ids=[f"{op.qualname.split('::')[1]}-{i}" for i, (op, _) in
                                                   enumerate(SAMPLES)])
def test_forced_overload_passes_opcheck(op, args, backend):
    if not mm_kernels.backends()[backend]:
        pytest.skip(f"backend {backend} is not available")
    torch.library.opcheck(op.forced, (*args, backend))


def test_dynamic_size_operator_passes_opcheck():
    """Without a capacity the number of rows depends on the routing map (a data-dependent size)."""
    routing_map = torch.rand(6, 4) > 0.5
    torch.library.opcheck(moe_ops.moe_sort_routing_map.default, (routing_map, -1),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
