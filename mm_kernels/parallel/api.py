"""``cp_attention``: attention over a sequence sharded across a context-parallel group.

The inputs are checked on every rank before the first exchange, and the ranks agree on the outcome
with one small all-reduce over the CP group: when one rank's inputs are invalid, or the ranks' shapes,
dtypes or masks differ, every rank raises at once instead of the others waiting in an all-to-all or a
ring exchange until the group's timeout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from mm_kernels.ops.attention import check_attention_args, default_scale
from mm_kernels.parallel.groups import CPGroups, cp_groups_of
from mm_kernels.parallel.layout import ulysses_degree_of
from mm_kernels.parallel.ring import RingComm, ring_attention
from mm_kernels.parallel.ulysses import check_ulysses_heads, ulysses_attention

# What the ranks of a CP group must agree on, in the order of the agreement tensor.
_AGREED = ("batch size B", "local sequence length S_local", "query heads Hq", "key/value heads Hkv",
           "head dim D", "dtype", "causal flag")
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_local(q: Tensor, k: Tensor, v: Tensor, algo: str, world: int, ulysses_degree: Optional[int]) -> None:
    """This rank's checks (ValueError / TypeError), all before any communication."""
    check_attention_args(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k must hold the same sequence piece as q (S_local={q.shape[1]}), got {tuple(k.shape)}")
    degree = ulysses_degree_of(algo, world, ulysses_degree)
    if degree > 1:
        check_ulysses_heads(q.shape[2], k.shape[2], degree)
    if world // degree > 1 and q.shape[1] * degree % 2 != 0:
        raise ValueError(f"ring attention needs an even sequence length per ring position (two zigzag chunks), "
                         f"got {q.shape[1] * degree}")


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("npu", torch.npu.current_device())


def _agree(group: dist.ProcessGroup, error: Exception | None, q: Tensor, k: Tensor, causal: bool) -> None:
    """Collective over ``group``: raises ``error`` on this rank, and a ValueError on the others, when any
    rank failed its checks or the ranks' inputs differ in one of :data:`_AGREED`."""
    me = dist.get_rank(group)
    values = [0] * len(_AGREED) if error is not None else [
        *q.shape[:3], k.shape[2], q.shape[3], _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1, int(causal)]
    failed = me + 1 if error is not None else 0
    # One MAX all-reduce gives the last failed rank + 1 and, per value, its maximum and -minimum.
    seen = torch.tensor([failed, *values, *(-x for x in values)], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=group)
    seen = seen.tolist()
    if error is not None:
        raise error
    if seen[0]:
        raise ValueError(f"cp_attention: rank {seen[0] - 1} of the context-parallel group got invalid inputs "
                         "(its own error says which); no rank started the exchange")
    count = len(_AGREED)
    for name, largest, negated_smallest in zip(_AGREED, seen[1:1 + count], seen[1 + count:], strict=True):
        if largest != -negated_smallest:
            raise ValueError(f"cp_attention: the ranks of the context-parallel group passed different {name}s "
                             f"({-negated_smallest} to {largest}); q, k and v must have one shape, dtype and "
                             "causal flag on every rank")


def _ring_attention(groups: CPGroups, causal: bool, scale: float):
    comm = None if groups.ring is None else RingComm(groups.ring, groups.ring_overlap)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ring_attention(q, k, v, comm, causal, scale)

    return attend


def cp_attention(q: Tensor, k: Tensor, v: Tensor, algo: str, cp_group: dist.ProcessGroup | CPGroups | None,
                 ulysses_degree: Optional[int] = None, causal: bool = True,
                 softmax_scale: Optional[float] = None) -> Tensor:
    """Context-parallel attention: equal to attention over the whole sequence, forward and backward.

    q [B, S_local, Hq, D], k/v [B, S_local, Hkv, D] are this rank's pieces of the sequence in ``algo``'s
    layout (``shard_sequence``); fp32/fp16/bf16/fp64, Hq a multiple of Hkv. ``algo``:
    ``ulysses_cp_algo`` (all-to-all over heads), ``megatron_cp_algo`` (ring) or ``hybrid_cp_algo``
    (Ulysses inside groups of ``ulysses_degree`` consecutive ranks, ring across them). ``cp_group``: the
    context-parallel process group (None: the default group), or the :class:`CPGroups` from
    ``new_cp_groups`` (needed for the second ring communicator). Returns out [B, S_local, Hq, D] in
    q.dtype, in the same layout; differentiable in q, k and v. Every rank of the group must call it;
    invalid inputs on any rank (or shapes that differ between ranks) raise ValueError/TypeError on
    every rank before any exchange.
    """
    if isinstance(cp_group, CPGroups):
        group, degree = cp_group.cp, ulysses_degree or cp_group.ulysses_degree
    else:
        group, degree = cp_group if cp_group is not None else dist.group.WORLD, ulysses_degree
    causal = bool(causal)
    error = None
    try:
        _check_local(q, k, v, algo, dist.get_world_size(group), degree)
    except (ValueError, TypeError) as failure:
        error = failure
    _agree(group, error, q, k, causal)
    groups = cp_groups_of(cp_group, algo, ulysses_degree)
    scale = default_scale(q, softmax_scale)
    attend = _ring_attention(groups, causal, scale)
    if groups.ulysses is None:
        return attend(q, k, v)
    return ulysses_attention(q, k, v, groups.ulysses, attend)
