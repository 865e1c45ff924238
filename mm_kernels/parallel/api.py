"""``cp_attention``: attention over a sequence sharded across a context-parallel group."""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor

from mm_kernels.ops.attention import check_attention_args, default_scale
from mm_kernels.parallel.groups import CPGroups, cp_groups_of
from mm_kernels.parallel.ring import RingComm, ring_attention
from mm_kernels.parallel.ulysses import check_ulysses_heads, ulysses_attention


def _ring_attention(groups: CPGroups, causal: bool, scale: float):
    comm = None if groups.ring is None else RingComm(groups.ring, groups.ring_overlap)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if comm is not None and comm.size > 1 and q.shape[1] % 2 != 0:
            raise ValueError(f"ring attention needs an even local sequence length (two zigzag chunks), got {q.shape[1]}")
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
    q.dtype, in the same layout; differentiable in q, k and v. Every rank of the group must call it.
    """
    check_attention_args(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k must hold the same sequence piece as q (S_local={q.shape[1]}), got {tuple(k.shape)}")
    groups = cp_groups_of(cp_group, algo, ulysses_degree)
    scale = default_scale(q, softmax_scale)
    causal = bool(causal)
    if groups.ulysses is not None:
        check_ulysses_heads(q.shape[2], k.shape[2], groups.ulysses_degree)
    attend = _ring_attention(groups, causal, scale)
    if groups.ulysses is None:
        return attend(q, k, v)
    return ulysses_attention(q, k, v, groups.ulysses, attend)

