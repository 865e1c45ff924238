"""The operators of the kernel contract: ``torch.ops.mm_kernels.<op>``, one kernel per device.

Each kernel declared in :mod:`mm_kernels.contract` becomes an operator with two overloads:
- ``default``: the dispatcher picks the kernel from the inputs' device, in C++. CPU runs the C++
  kernel (``mm_kernels._C`` registers it), CUDA the Triton kernel, Ascend (PrivateUse1) the torch_npu
  one. Other devices, and devices whose backend is not available here, run the
  ``CompositeExplicitAutograd`` kernel: the reference, with one warning.
- ``forced``: takes one more argument, ``backend``, and runs that backend's Python kernel. It serves
  ``MM_KERNELS_BACKEND`` / ``use_backend`` and inputs of a dtype the fused kernels do not take (fp64),
  which run ``reference``.
Both overloads share the fake implementation and the autograd formula. Calling a :class:`KernelOp`
picks the overload. In eager mode, with plain tensors, a default-overload call goes straight to the
device kernel below autograd, wrapped in an autograd.Function of the same formula when a gradient is
to be recorded: this skips the dispatcher's Python autograd kernel, most of the per-call cost.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from mm_kernels._extension import cpu_extension
from mm_kernels.contract import Family
from mm_kernels.dispatch import (
    auto_backend,
    check_backend_name,
    forced_backend,
    npu_importable,
    triton_importable,
)
from mm_kernels.precision import runs_on_reference

_LIB = torch.library.Library("mm_kernels", "FRAGMENT")
_KEYS = torch._C.DispatchKey
# The dispatch key set of each device's backend kernel: a call with nothing to record for autograd
# goes straight there.
_BELOW_AUTOGRAD = {
    "cpu": torch._C.DispatchKeySet(_KEYS.CPU),
    "cuda": torch._C.DispatchKeySet(_KEYS.CUDA),
    "npu": torch._C.DispatchKeySet(_KEYS.PrivateUse1),
}
# Device kernels registered from Python: (backend, dispatch key, is the backend's package installed).
_PYTHON_DEVICE_KERNELS = (("triton", "CUDA", triton_importable), ("npu", "PrivateUse1", npu_importable))


@functools.cache
def backend_module(backend: str, family: type[Family]) -> ModuleType:
    """``mm_kernels.<backend>.<family.module>``, imported on first use (so importing mm_kernels never
    imports triton or torch_npu)."""
    return importlib.import_module(f"mm_kernels.{backend}.{family.module}")


def _as_outputs(result: Any, like: Tensor) -> Any:
    """A kernel's result as the operator returns it: contiguous tensors, an empty tensor for None."""
    if isinstance(result, tuple):
        return tuple(_as_outputs(r, like) for r in result)
    return like.new_empty(0) if result is None else result.contiguous()


class KernelOp:
    """The operator ``mm_kernels::<family.prefix><name>`` of one declared kernel; call it like the kernel.

    ``before(*args)`` runs ahead of every Python kernel: it checks values that need the data and may
    answer edge cases itself (it returns the outputs, or None to run the kernel).
    """

    def __init__(self, family: type[Family], name: str, before: Callable[..., Any] | None = None):
        cpu_extension()  # registers the C++ CPU kernels before the operator is defined
        self.family, self.name, self._before = family, name, before
        op_name = family.prefix + name
        self.qualname = f"mm_kernels::{op_name}"
        schema = torch.library.infer_schema(family.kernels()[name], mutates_args=())
        _LIB.define(op_name + schema)
        _LIB.define(f"{op_name}.forced" + schema.replace(") -> ", ", str backend) -> ", 1))
        packet = getattr(torch.ops.mm_kernels, op_name)
        self.default, self.forced = packet.default, packet.forced
        self._tensor_args = tuple(i for i, arg in enumerate(self.default._schema.arguments)
                                  if str(arg.type) in ("Tensor", "Optional[Tensor]"))
        if cpu_extension() is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname, "CPU"):
            _LIB.impl(op_name, self._device_kernel("cpu"), "CPU")
        for backend, key, installed in _PYTHON_DEVICE_KERNELS:
            if installed():
                _LIB.impl(op_name, self._device_kernel(backend), key)
        _LIB.impl(op_name, self._auto_kernel, "CompositeExplicitAutograd")
        _LIB.impl(f"{op_name}.forced", self._forced_kernel, "CompositeExplicitAutograd")

    def _run_kernel(self, backend: str, args: tuple) -> Any:
        if self._before is not None:
            early = self._before(*args)
            if early is not None:
                return early
        return _as_outputs(getattr(backend_module(backend, self.family), self.name)(*args), args[0])

    def _device_kernel(self, backend: str) -> Callable[..., Any]:
        return lambda *args: self._run_kernel(backend, args)

    def _auto_kernel(self, *args: Any) -> Any:
        return self._run_kernel(auto_backend(args[0].device), args)

    def _forced_kernel(self, *args: Any) -> Any:
        *args, backend = args
        return self._run_kernel(check_backend_name(backend, "backend"), tuple(args))

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        """Registers ``fake`` (output shapes from input shapes) for both overloads; usable as a decorator."""
        torch.library.register_fake(self.default, fake, lib=_LIB)
        torch.library.register_fake(self.forced, lambda *args: fake(*args[:-1]), lib=_LIB)
        return fake

    def register_autograd(self, backward: Callable[..., tuple], setup_context: Callable[..., None]) -> None:
        """Registers the autograd formula for both overloads. ``setup_context`` sees the kernel's inputs;
        ``ctx.backend`` holds the forced backend (None for the default overload), for the backward's calls
        of other operators through :meth:`run`."""

        def setup_default(ctx, inputs, output):
            ctx.backend = None
            setup_context(ctx, inputs, output)

        def setup_forced(ctx, inputs, output):
            ctx.backend = inputs[-1]
            setup_context(ctx, inputs[:-1], output)

        def backward_forced(ctx, *grads):
            return (*backward(ctx, *grads), None)

        torch.library.register_autograd(self.default, backward, setup_context=setup_default, lib=_LIB)
        torch.library.register_autograd(self.forced, backward_forced, setup_context=setup_forced, lib=_LIB)
        default = self.default

        class Eager(torch.autograd.Function):
            """The default overload's autograd formula for eager calls: the device kernel's key set first."""

            @staticmethod
            def forward(ctx, keyset, *inputs):
                output = default.redispatch(keyset, *inputs)
                setup_default(ctx, inputs, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return (None, *backward(ctx, *grads))

        self._eager = Eager

    def __call__(self, *args: Any) -> Any:
        """Runs the operator on the forced backend, else on the device's kernel (fp64: the reference)."""
        backend = "reference" if runs_on_reference(args[0]) else forced_backend()
        return self.run(backend, *args)

    def run(self, backend: str | None, *args: Any) -> Any:
        """Runs the ``forced`` overload on ``backend``, or the ``default`` one when it is None."""
        if backend is not None:
            return self.forced(*args, backend)
        keyset = None if torch.compiler.is_compiling() else self._eager_keyset(args)
        if keyset is None:
            return self.default(*args)
        if torch.is_grad_enabled() and any(args[i] is not None and args[i].requires_grad for i in self._tensor_args):
            return self._eager.apply(keyset, *args)
        return self.default.redispatch(keyset, *args)

    def _eager_keyset(self, args: tuple) -> torch._C.DispatchKeySet | None:
        """The device kernel's key set for an eager call on plain tensors that no mode or transform
        intercepts; else None (a normal dispatch)."""
        first = args[0]
        if (type(first) is not Tensor or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active()):
            return None
        return _BELOW_AUTOGRAD.get(first.device.type)
