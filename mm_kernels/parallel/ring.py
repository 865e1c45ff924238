"""Ring attention (``megatron_cp_algo``): key/value blocks travel round the ring, forward and backward.

Each rank holds the zigzag chunks (r, 2n-1-r) of q, k and v (see ``layout``). At step i it attends
its queries to the key/value block of rank (r - i) mod n while the next block is in flight
(isend/irecv posted before the compute, waited after it). With a causal mask:
- step 0, its own block: causal attention over its two chunks (their order is the global order);
- a block from an earlier rank: both query chunks see the block's first chunk only, unmasked;
- a block from a later rank: only the second query chunk sees it, both chunks unmasked.
The half blocks are computed as two chunk x chunk blocks, so every rank runs one causal block and
2(n-1) unmasked blocks of one shape: the same work, and the same kernel shapes, on every rank.

Partial results are merged with their log-sum-exp in fp32 (fp64 for fp64), in the overflow-free
form  out -= sigmoid(lse_b - lse) * (out - out_b);  lse -= logsigmoid(lse - lse_b).
Backward: the blocks travel the same way; dQ accumulates locally in fp32, and each block's dK/dV
accumulator (fp32) travels with it and is sent home after the last step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mm_kernels.ops.attention import attention_bwd, attention_fwd
from mm_kernels.parallel.stats import count_sent, timed_compute
from mm_kernels.precision import compute_dtype

_KV_TAG = 0
_DKV_TAG = 1


class RingComm:
    """Point-to-point exchange with the ring neighbours: send to rank + 1, receive from rank - 1.

    Sends and receives are posted in parity order (even ranks send first, odd ranks receive first),
    each on its own contiguous tensor (batched isend/irecv can hang on gloo). With ``overlap_group``
    a rank sends on one communicator and receives on the other (chosen by the sender's parity, so
    both ends agree for any ring size).
    """

    def __init__(self, group: dist.ProcessGroup, overlap_group: dist.ProcessGroup | None = None):
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = (self.rank + 1) % self.size
        self.prev = (self.rank - 1) % self.size
        channels = (group, overlap_group or group)
        self._send_group = channels[self.rank % 2]
        self._recv_group = channels[self.prev % 2]

    def exchange(self, send: Tensor, recv: Tensor, tag: int) -> list[dist.Work]:
        """Posts send of ``send`` to the next rank and receive into ``recv`` from the previous one."""
        count_sent(send.numel() * send.element_size())

        def post_send():
            return dist.isend(send, group=self._send_group, group_dst=self.next, tag=tag)

        def post_recv():
            return dist.irecv(recv, group=self._recv_group, group_src=self.prev, tag=tag)

        if self.rank % 2 == 0:
            return [post_send(), post_recv()]
        return [post_recv(), post_send()]


class _Transfer:
    """One posted exchange of ``send`` round the ring; :meth:`wait` returns what arrived."""

    def __init__(self, comm: RingComm, send: Tensor, tag: int):
        self._send = send
        self._recv = torch.empty_like(send)
        self._works = comm.exchange(send, self._recv, tag)

    def wait(self) -> Tensor:
        for work in self._works:
            work.wait()
        return self._recv


def _blocks(step: int, comm: RingComm | None, causal: bool, seq: int) -> list[tuple[slice, slice, bool]]:
    """(query rows, key rows, causal) of the blocks computed at ``step`` (see the module docstring)."""
    everything = slice(None)
    if step == 0 or not causal:
        return [(everything, everything, causal and step == 0)]
    first, second = slice(0, seq // 2), slice(seq // 2, None)
    if (comm.rank - step) % comm.size < comm.rank:
        return [(first, first, False), (second, first, False)]
    return [(second, first, False), (second, second, False)]


def _pack(k: Tensor, v: Tensor) -> Tensor:
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(buffer: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    k, v = buffer.chunk(2)
    return k.view(shape), v.view(shape)


def _merge_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Merges a partial result into (out [B, S, H, D], lse [B, H, S]) in place, in their dtype."""
    block_lse = block_lse.to(lse.dtype)
    weight = torch.sigmoid(block_lse - lse).transpose(1, 2).unsqueeze(-1)
    out.sub_(weight * (out - block_out.to(out.dtype)))
    lse.sub_(F.logsigmoid(lse - block_lse))


def _ring_size(comm: RingComm | None) -> int:
    return 1 if comm is None else comm.size


def _kv_steps(k: Tensor, v: Tensor, comm: RingComm | None, causal: bool, seq: int):
    """Yields (k, v, blocks) for each ring step: the step's K/V and its :func:`_blocks`; the next step's
    K/V transfer is in flight while the caller computes on the current one."""
    kv = _pack(k, v)
    size = _ring_size(comm)
    for step in range(size):
        transfer = _Transfer(comm, kv, _KV_TAG) if step + 1 < size else None
        yield *_unpack(kv, k.shape), _blocks(step, comm, causal, seq)
        if transfer is not None:
            kv = transfer.wait()


def ring_forward(q: Tensor, k: Tensor, v: Tensor, comm: RingComm | None, causal: bool,
                 scale: float) -> tuple[Tensor, Tensor]:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] (zigzag shards) -> (out like q, lse [B, Hq, S] fp32/fp64).

    ``comm`` None: a ring of one rank (plain local attention).
    """
    acc = compute_dtype(q.dtype)
    out = lse = None
    for k_step, v_step, blocks in _kv_steps(k, v, comm, causal, q.shape[1]):
        for rows, keys, block_causal in blocks:
            with timed_compute(q[:, rows], k_step[:, keys], block_causal):
                block_out, block_lse = attention_fwd(q[:, rows], k_step[:, keys], v_step[:, keys], block_causal, scale)
            if out is None:
                out, lse = block_out.to(acc), block_lse.to(acc)
            else:
                _merge_(out[:, rows], lse[:, :, rows], block_out, block_lse)
    return out.to(q.dtype), lse


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, comm: RingComm | None,
                  causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) like (q, k, v) of :func:`ring_forward` given dout and its (out, lse)."""
    acc = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = torch.zeros(2 * k.numel(), dtype=acc, device=k.device)
    dkv_transfer = None
    for k_step, v_step, blocks in _kv_steps(k, v, comm, causal, q.shape[1]):
        kv_grads = []
        for rows, keys, block_causal in blocks:
            with timed_compute(q[:, rows], k_step[:, keys], block_causal, backward=True):
                dq_block, dk_block, dv_block = attention_bwd(dout[:, rows], q[:, rows], k_step[:, keys],
                                                             v_step[:, keys], out[:, rows], lse[:, :, rows],
                                                             block_causal, scale)
            dq[:, rows] += dq_block
            kv_grads.append((keys, dk_block, dv_block))
        if dkv_transfer is not None:
            dkv = dkv_transfer.wait()
        dk_acc, dv_acc = _unpack(dkv, k.shape)
        for keys, dk_block, dv_block in kv_grads:
            dk_acc[:, keys] += dk_block
            dv_acc[:, keys] += dv_block
        if _ring_size(comm) > 1:
            dkv_transfer = _Transfer(comm, dkv, _DKV_TAG)
    if dkv_transfer is not None:
        dkv = dkv_transfer.wait()
    dk, dv = _unpack(dkv, k.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm, causal, scale):
        out, lse = ring_forward(q, k, v, comm, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.causal, ctx.scale = comm, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.comm, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, comm: RingComm | None, causal: bool, scale: float) -> Tensor:
    """Attention of the local zigzag shards q [B, S, Hq, D], k/v [B, S, Hkv, D] over the ring's whole
    sequence -> out [B, S, Hq, D] in q.dtype; differentiable in q, k and v. ``comm`` None: local attention."""
    return _RingAttention.apply(q, k, v, comm, causal, scale)
