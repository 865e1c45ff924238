"""Ulysses (``ulysses_cp_algo``): all-to-all from sequence-sharded to head-sharded and back.

With degree U, each rank sends head group j of its sequence piece to rank j and receives every
rank's piece of its own head group: [B, S/U, H, D] -> [B, S, H/U, D]. The inverse all-to-all brings
the attention output back. q, k and v travel in one ``all_to_all_single`` (it works on gloo, NCCL
and HCCL), and so do their gradients. Grouped-query attention: Hkv divisible by U, or U a multiple
of Hkv, in which case each key/value head is repeated U / Hkv times before the exchange (autograd
sums the repeats' gradients back).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from mm_kernels.parallel.stats import count_sent


def check_ulysses_heads(heads_q: int, heads_kv: int, degree: int) -> None:
    """Raises ValueError unless Hq is divisible by the Ulysses degree and Hkv divides or is divided by it."""
    if heads_q % degree != 0:
        raise ValueError(f"the query heads Hq={heads_q} must be divisible by the Ulysses degree {degree}")
    if heads_kv % degree != 0 and degree % heads_kv != 0:
        raise ValueError(
            f"the key/value heads Hkv={heads_kv} must be divisible by the Ulysses degree {degree}, or the degree "
            f"a multiple of Hkv (heads are then repeated)")


def _all_to_all(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """all_to_all_single over dim 0 of a contiguous [U, ...] tensor."""
    out = torch.empty_like(x)
    count_sent(x.numel() * x.element_size() * (x.shape[0] - 1) // x.shape[0])
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(xs: tuple[Tensor, ...], group: dist.ProcessGroup) -> tuple[Tensor, ...]:
    """Tensors [B, S/U, H_i, D] -> [B, S, H_i/U, D] (rank j keeps head group j), one exchange."""
    degree = dist.get_world_size(group)
    batch, seq, _, dim = xs[0].shape
    parts = [x.reshape(batch, seq, degree, x.shape[2] // degree, dim) for x in xs]
    sizes = [p.shape[3] for p in parts]
    send = torch.cat(parts, dim=3).permute(2, 0, 1, 3, 4).contiguous()
    recv = _all_to_all(send, group).permute(1, 0, 2, 3, 4).reshape(batch, degree * seq, sum(sizes), dim)
    return tuple(t.contiguous() for t in recv.split(sizes, dim=2))


def _heads_to_seq(xs: tuple[Tensor, ...], group: dist.ProcessGroup) -> tuple[Tensor, ...]:
    """Tensors [B, S, H_i/U, D] -> [B, S/U, H_i, D]: the inverse of :func:`_seq_to_heads`."""
    degree = dist.get_world_size(group)
    batch, seq, _, dim = xs[0].shape
    sizes = [x.shape[2] for x in xs]
    send = torch.cat(xs, dim=2).reshape(batch, degree, seq // degree, sum(sizes), dim).transpose(0, 1).contiguous()
    recv = _all_to_all(send, group).permute(1, 2, 0, 3, 4)
    return tuple(t.reshape(batch, seq // degree, degree * t.shape[3], dim) for t in recv.split(sizes, dim=3))


class _AllToAll(torch.autograd.Function):
    """Sequence-to-heads (``to_heads``) or heads-to-sequence exchange of several tensors; the backward is
    the inverse exchange of their gradients."""

    @staticmethod
    def forward(ctx, group, to_heads, *xs):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(xs, group)

    @staticmethod
    def backward(ctx, *grads):
        grads = tuple(g.contiguous() for g in grads)
        return None, None, *(_heads_to_seq if ctx.to_heads else _seq_to_heads)(grads, ctx.group)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup,
                      attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    """Runs ``attend`` on head-sharded, sequence-gathered q, k, v and returns its output sequence-sharded.

    q [B, S/U, Hq, D], k/v [B, S/U, Hkv, D] -> out [B, S/U, Hq, D]; ``attend`` gets [B, S, Hq/U, D] and
    [B, S, max(Hkv, U)/U, D]. Differentiable (the all-to-alls' backward is the inverse all-to-all).
    """
    degree = dist.get_world_size(group)
    check_ulysses_heads(q.shape[2], k.shape[2], degree)
    if k.shape[2] < degree:
        repeats = degree // k.shape[2]
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    q_heads, k_heads, v_heads = _AllToAll.apply(group, True, q, k, v)
    (out,) = _AllToAll.apply(group, False, attend(q_heads, k_heads, v_heads))
    return out
