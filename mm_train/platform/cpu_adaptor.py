"""Patches that let megatron-core (pinned 0.16.1) run on CPU with gloo, and without its optional packages.

Megatron-core hard-codes CUDA in places (device strings, the CUDA RNG tracker, dtype-name
checks, CUDA streams). :func:`apply_cpu_adaptor` installs one small patch per failure
(:data:`PATCHES`), only when the process has no CUDA or NPU device
(:func:`mm_train.launch.device_type`). Megatron-core also calls two optional packages as if they were
installed (Transformer Engine's GEMM in the MoE router, grouped_gemm in GroupedMLP);
:func:`apply_package_fallbacks` stands in for them (:data:`FALLBACKS`) on any device when they are
missing.
What is not about the CPU goes through megatron-core's layer spec instead (the norms, see
:mod:`mm_train.model.build`). Each :class:`Patch` names the failure it
fixes and carries ``still_needed``, a check against the pinned megatron-core source that
turns false when an upgrade removes the failure (tests/test_train_cpu_adaptor.py then fails,
so the stale patch gets deleted).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from mm_train.launch import device_type

CUDA_TENSOR_TYPES = {name: name.replace("torch.", "torch.cuda.")
                     for name in ("torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor")}


@dataclass(frozen=True)
class Patch:
    """One adaptor patch: ``fixes`` says which megatron-core failure it removes."""

    name: str
    fixes: str
    apply: Callable[[], None]
    still_needed: Callable[[], bool]


def _is_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Runs torch calls that name a CUDA device on the CPU instead.

    ``device="cuda"`` (or cuda:N) becomes ``cpu``; ``Tensor.cuda()`` returns the tensor;
    ``Tensor.type()`` reports the CUDA type name megatron-core asserts on.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and args[1:] and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return CUDA_TENSOR_TYPES.get(result, result)
        return result


_MODE = CudaToCpuMode()


def _enter_cuda_to_cpu_mode() -> None:
    _MODE.__enter__()
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None


def _cuda_hard_coded() -> bool:
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.transformer import utils

    return ('device="cuda"' in inspect.getsource(utils.get_default_causal_mask)
            and "device='cuda'" in inspect.getsource(clip_grads.get_grad_norm_fp32)
            and "torch.cuda.synchronize()" in inspect.getsource(P2PCommunicator._communicate_shapes))


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state
    random.CudaRNGStatesTracker.add = add
    random.CudaRNGStatesTracker.fork = fork


def _rng_tracker_is_cuda() -> bool:
    from megatron.core.tensor_parallel import random

    return ("torch.cuda.get_rng_state" in inspect.getsource(random.CudaRNGStatesTracker.add)
            and "torch.cuda" in inspect.getsource(random._set_cuda_rng_state))


def _patch_router_gemm_fallback() -> None:
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


def _router_gemm_name_undefined() -> bool:
    from megatron.core.transformer.moe import moe_utils

    source = inspect.getsource(moe_utils)
    return "te_general_gemm is not None" in source and "te_general_gemm = None" not in source


def _splits_to_host(tensor, as_numpy=False, record_stream=False):
    """maybe_move_tensor_to_cpu that also turns CPU tensors into numpy split sizes when asked."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    return tensor.cpu() if torch.is_tensor(tensor) else tensor


def _patch_split_sizes() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _splits_to_host


def _split_sizes_stay_tensors_on_cpu() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return "tensor.is_cuda" in inspect.getsource(moe_utils.maybe_move_tensor_to_cpu)


def _host_copies_without_streams(self, point, tokens_per_expert=None):
    """The alltoall dispatcher's device-to-host step, done in place of its CUDA side stream."""
    from megatron.core.transformer.moe import token_dispatcher

    if self.drop_and_pad or point != self.cuda_dtoh_point:
        return tokens_per_expert
    to_host = token_dispatcher.maybe_move_tensor_to_cpu
    self.input_splits = to_host(self.input_splits, as_numpy=True)
    self.output_splits = to_host(self.output_splits, as_numpy=True)
    self.output_splits_tp = to_host(self.output_splits_tp, as_numpy=True)
    self.num_out_tokens = to_host(self.num_out_tokens)
    if self.num_local_experts > 1 and not self.config.moe_permute_fusion:
        self.num_global_tokens_per_local_expert = to_host(self.num_global_tokens_per_local_expert)
    return to_host(tokens_per_expert)


def _patch_alltoall_streams() -> None:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "cpu"  # not None: __init__ then makes no torch.cuda.Stream
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _host_copies_without_streams


def _alltoall_uses_cuda_streams() -> bool:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    return ("torch.cuda.Stream()" in inspect.getsource(MoEAlltoAllTokenDispatcher.__init__)
            and "torch.cuda.stream(" in inspect.getsource(MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize))


class _LoopGroupedGemm:
    """grouped_gemm's ``ops`` on any device: one matmul per expert block of rows."""

    @staticmethod
    def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
        """a [sum(batch_sizes), K], b [E, K, N] (or [E, N, K] with trans_b) -> [sum(batch_sizes), N]."""
        blocks = torch.split(a, [int(n) for n in batch_sizes])
        return torch.cat([block @ (w.t() if trans_b else w) for block, w in zip(blocks, b, strict=True)])


def _patch_grouped_gemm() -> None:
    from megatron.core.transformer.moe import grouped_gemm_util

    grouped_gemm_util.grouped_gemm = _LoopGroupedGemm
    grouped_gemm_util.ops = _LoopGroupedGemm


def _grouped_gemm_missing() -> bool:
    from megatron.core.transformer.moe import grouped_gemm_util

    return "import grouped_gemm" in inspect.getsource(grouped_gemm_util) and (
        importlib.util.find_spec("grouped_gemm") is None)


PATCHES = (
    Patch("cuda-to-cpu", "device='cuda' / .cuda() / 'torch.cuda.FloatTensor' checks, torch.cuda.current_device() "
          "and torch.cuda.synchronize() (causal mask, clip_grads, optimizer, distrib_optimizer, rope_utils, "
          "schedules, pipeline shape exchange) fail without CUDA",
          _enter_cuda_to_cpu_mode, _cuda_hard_coded),
    Patch("cpu-rng-tracker", "the model-parallel RNG tracker reads and seeds torch.cuda generators",
          _patch_rng_tracker, _rng_tracker_is_cuda),
    Patch("moe-split-sizes", "moe_utils.maybe_move_tensor_to_cpu returns CPU tensors unchanged although asked for "
          "numpy, so the alltoall dispatcher passes tensor split sizes to all_to_all_single (TypeError)",
          _patch_split_sizes, _split_sizes_stay_tensors_on_cpu),
    Patch("moe-alltoall-streams", "the alltoall token dispatcher creates a torch.cuda.Stream and copies its split "
          "sizes to the host on it", _patch_alltoall_streams, _alltoall_uses_cuda_streams),
)

# Stand-ins for optional packages megatron-core uses unconditionally, on any device; still_needed is true
# while the package is missing.
FALLBACKS = (
    Patch("moe-router-gemm", "the MoE router's gating GEMM reads moe_utils.te_general_gemm, a name only defined "
          "when Transformer Engine imports (NameError without it)", _patch_router_gemm_fallback,
          _router_gemm_name_undefined),
    Patch("moe-grouped-gemm", "GroupedMLP (--moe-grouped-gemm) needs the CUDA-only grouped_gemm package (assertion, "
          "gg.ops is None); the patch supplies its gmm as one matmul per expert", _patch_grouped_gemm,
          _grouped_gemm_missing),
)

_applied_patches: list[str] = []
_applied_fallbacks: list[str] = []


def apply_cpu_adaptor() -> list[str]:
    """Applies every patch of :data:`PATCHES` once when there is no CUDA/NPU device; returns the names
    applied so far."""
    if device_type() == "cpu" and not _applied_patches:
        for patch in PATCHES:
            patch.apply()
            _applied_patches.append(patch.name)
    return list(_applied_patches)


def apply_package_fallbacks() -> list[str]:
    """Applies, once, each fallback of :data:`FALLBACKS` whose package is missing; returns their names."""
    for patch in FALLBACKS:
        if patch.name not in _applied_fallbacks and patch.still_needed():
            patch.apply()
            _applied_fallbacks.append(patch.name)
    return list(_applied_fallbacks)
