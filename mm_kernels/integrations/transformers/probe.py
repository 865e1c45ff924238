"""Equivalence probe: a module's own forward and its fused forward on the same random inputs.

The probe runs on a replica of the module (its class, attributes and submodule tree, without hooks),
so the model itself is never touched. The replica shares the module's weights when they are ordinary
tensors; weights on the meta device or sharded as DTensors (FSDP2) are replaced by random ones of the
same global shape and dtype, on the module's device (meta: the accelerator if there is one, else CPU).
Outputs and the gradients of every floating-point input are compared, relative to the largest
reference value, within the tolerance of the module's dtype. Randomness comes from a private
generator, so probing leaves the global RNG state alone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from mm_kernels.integrations.transformers.kinds import Kind

# Largest |fused - original| allowed, relative to the largest |original|: four units in the last
# place for the half types (the two sides round at different steps), 1e-5 for fp32 (summation order).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 4 * 2.0**-10, torch.bfloat16: 4 * 2.0**-7}

_RANDOM_BLOCK = 1 << 16  # random values generated per weight; larger weights repeat them


@dataclass(frozen=True)
class ProbeResult:
    """``ok`` when every compared tensor is within tolerance; ``detail`` names the worst one."""

    ok: bool
    detail: str


def plain_class(module: nn.Module) -> type:
    """The module's own class, below the classes FSDP2's ``fully_shard`` creates."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def module_dtype(module: nn.Module) -> torch.dtype:
    """dtype of the module's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _is_local(tensor: Tensor) -> bool:
    return not isinstance(tensor, DTensor) and tensor.device.type != "meta"


def probe_device(module: nn.Module) -> torch.device:
    """Where the probe runs: the device of the module's weights (meta: the accelerator if any, else CPU)."""
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return accelerator or torch.device("cpu")


def _random_values(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                   generator: torch.Generator) -> Tensor:
    """Random values of ``shape``: 1 +- 0.5 for vectors, +-1/sqrt(fan_in) for matrices.

    At most _RANDOM_BLOCK values are drawn and repeated; a stack of matrices (MoE experts) is one
    random matrix expanded, so probing a meta-device model allocates about one expert's worth.
    """
    if len(shape) >= 3:
        return _random_values(shape[-2:], dtype, device, generator).expand(shape)
    numel = math.prod(shape)
    block = torch.rand(min(numel, _RANDOM_BLOCK), generator=generator) * 2 - 1
    block = 1 + 0.5 * block if len(shape) <= 1 else block / shape[-1] ** 0.5
    values = block.repeat(-(-numel // max(block.numel(), 1)))[:numel]
    return values.reshape(shape).to(device=device, dtype=dtype)


def _stand_in(tensor: Tensor, device: torch.device, generator: torch.Generator) -> Tensor:
    """``tensor`` itself (detached) when local; random values of its global shape for meta/DTensor."""
    if _is_local(tensor):
        return tensor.detach()
    return _random_values(tuple(tensor.shape), tensor.dtype, device, generator)


def _replica(module: nn.Module, device: torch.device, generator: torch.Generator) -> nn.Module:
    """A hook-free copy of module's tree; local weights shared (detached), meta/DTensor weights random."""
    clone = object.__new__(plain_class(module))
    nn.Module.__init__(clone)
    for key, value in module.__dict__.items():
        if key not in clone.__dict__ and key != "forward":
            clone.__dict__[key] = value
    clone.training = module.training
    for name, param in module._parameters.items():
        clone._parameters[name] = None if param is None else nn.Parameter(_stand_in(param, device, generator),
                                                                          requires_grad=False)
    for name, buffer in module._buffers.items():
        clone._buffers[name] = None if buffer is None else _stand_in(buffer, device, generator)
    for name, child in module._modules.items():
        clone._modules[name] = None if child is None else _replica(child, device, generator)
    return clone


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (inf when either holds a non-finite value)."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.double(), expected.double()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    largest = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (largest if largest > 0 else 1.0)


def _forward(forward, module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    return forward(module, *leaves), [x for x in leaves if x.requires_grad]


def _gradients(out: Tensor, leaves: list[Tensor], cotangent: Tensor) -> list[Tensor]:
    grads = torch.autograd.grad(out, leaves, cotangent, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]


def probe(module: nn.Module, kind: Kind, seed: int = 0) -> ProbeResult:
    """Runs ``module``'s own forward and ``kind.forward`` on one random input and compares them."""
    dtype = module_dtype(module)
    device = probe_device(module)
    generator = torch.Generator().manual_seed(seed)
    replica = _replica(module, device, generator)
    inputs = tuple(x.to(device) for x in kind.probe_inputs(replica, dtype, generator))
    original = plain_class(module).forward
    autocast = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()
    with torch.enable_grad(), autocast:
        try:
            ref_out, ref_leaves = _forward(original, replica, inputs)
        except Exception as exc:  # noqa: BLE001 - a kind that cannot be checked is not fused
            return ProbeResult(False, f"the original forward failed on the probe input ({type(exc).__name__}: {exc})")
        cotangent = torch.randn(ref_out.shape, generator=generator).to(device=device, dtype=ref_out.dtype)
        ref_grads = _gradients(ref_out, ref_leaves, cotangent)
        try:
            out, leaves = _forward(kind.forward, replica, inputs)
            if out.shape != ref_out.shape or out.dtype != ref_out.dtype:
                return ProbeResult(False, f"the fused output is {tuple(out.shape)} {out.dtype}, "
                                          f"the original {tuple(ref_out.shape)} {ref_out.dtype}")
            grads = _gradients(out, leaves, cotangent)
        except Exception as exc:  # noqa: BLE001
            return ProbeResult(False, f"the fused forward failed ({type(exc).__name__}: {exc})")
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    names = ["output"] + [f"the gradient of input {i}" for i in range(len(grads))]
    errors = [_relative_error(a, b) for a, b in zip([out, *grads], [ref_out, *ref_grads], strict=True)]
    worst = max(range(len(errors)), key=errors.__getitem__)
    detail = (f"{names[worst]} differs by {errors[worst]:.1e} of its largest value "
              f"(tolerance {tolerance:.1e} for {str(dtype).removeprefix('torch.')})")
    return ProbeResult(errors[worst] <= tolerance, detail)
