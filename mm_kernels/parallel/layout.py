"""Sequence layouts of the context-parallel algorithms, and the shard / unshard pair for each.

- ``ulysses_cp_algo``: the sequence is cut into W contiguous pieces, rank r holds piece r.
- ``megatron_cp_algo`` (ring): cut into 2W chunks, rank r holds chunks r and 2W-1-r (zigzag), so
  with a causal mask every rank does the same amount of work.
- ``hybrid_cp_algo`` with Ulysses degree U and ring size R = W / U: zigzag over the R ring
  positions (2R chunks), then each ring position's two chunks are cut into U contiguous pieces,
  one per rank of its Ulysses group (ranks jU .. jU+U-1 for ring position j).

In every case the ranks' pieces, taken in rank order, are a permutation of the sequence
(:func:`sequence_order`), so unsharding is an all-gather and the inverse permutation.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

ULYSSES = "ulysses_cp_algo"
RING = "megatron_cp_algo"
HYBRID = "hybrid_cp_algo"
CP_ALGOS = (ULYSSES, RING, HYBRID)


def check_ulysses_degree(world_size: int, ulysses_degree: int | None) -> int:
    """The hybrid rule: the Ulysses degree U divides the context-parallel size W (any divisor: U = 1 is
    the ring alone, U = W is Ulysses alone). Returns U; raises ValueError otherwise."""
    if ulysses_degree is None or ulysses_degree < 1 or world_size % ulysses_degree != 0:
        raise ValueError(
            f"hybrid_cp_algo needs ulysses_degree dividing the context-parallel size {world_size}, got {ulysses_degree}"
        )
    return ulysses_degree


def ulysses_degree_of(algo: str, world_size: int, ulysses_degree: int | None) -> int:
    """The Ulysses degree U of ``algo`` on ``world_size`` ranks (W for Ulysses, 1 for ring, given for hybrid).

    Raises ValueError for an unknown algo, or a hybrid degree that breaks :func:`check_ulysses_degree`.
    """
    if algo not in CP_ALGOS:
        raise ValueError(f"algo must be one of {', '.join(CP_ALGOS)}, got {algo!r}")
    if algo == ULYSSES:
        return world_size
    if algo == RING:
        return 1
    return check_ulysses_degree(world_size, ulysses_degree)


def required_multiple(algo: str, world_size: int, ulysses_degree: int | None = None) -> int:
    """The smallest number every sequence length must be a multiple of for ``algo`` on ``world_size`` ranks."""
    degree = ulysses_degree_of(algo, world_size, ulysses_degree)
    ring = world_size // degree
    return degree if ring == 1 else ring * math.lcm(2, degree)


def sequence_order(seq_len: int, algo: str, world_size: int, ulysses_degree: int | None = None) -> Tensor:
    """Positions of the sequence in rank order: rank r holds ``order[r*L:(r+1)*L]``, L = seq_len / W (int64)."""
    multiple = required_multiple(algo, world_size, ulysses_degree)
    if seq_len % multiple != 0:
        raise ValueError(
            f"{algo} on {world_size} ranks needs a sequence length that is a multiple of {multiple}, got {seq_len}"
        )
    ring = world_size // ulysses_degree_of(algo, world_size, ulysses_degree)
    if ring == 1:
        return torch.arange(seq_len)
    chunks = torch.arange(seq_len).view(2 * ring, -1)
    return torch.cat([torch.cat([chunks[j], chunks[2 * ring - 1 - j]]) for j in range(ring)])


def _dim(x: Tensor, seq_dim: int) -> int:
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim={seq_dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return seq_dim % x.dim()


def shard_for_rank(x: Tensor, algo: str, world_size: int, rank: int, ulysses_degree: int | None = None,
                   seq_dim: int = 1) -> Tensor:
    """The piece of the full sequence ``x`` (sequence along ``seq_dim``) that ``rank`` holds under ``algo``."""
    dim = _dim(x, seq_dim)
    order = sequence_order(x.shape[dim], algo, world_size, ulysses_degree)
    local = x.shape[dim] // world_size
    return x.index_select(dim, order[rank * local:(rank + 1) * local].to(x.device))


def unshard_pieces(pieces: list[Tensor], algo: str, ulysses_degree: int | None = None, seq_dim: int = 1) -> Tensor:
    """The full sequence from every rank's piece (in rank order): the inverse of :func:`shard_for_rank`."""
    dim = _dim(pieces[0], seq_dim)
    gathered = torch.cat(pieces, dim=dim)
    order = sequence_order(gathered.shape[dim], algo, len(pieces), ulysses_degree)
    return gathered.index_select(dim, torch.argsort(order).to(gathered.device))


def shard_sequence(x: Tensor, algo: str, group: dist.ProcessGroup | None = None, ulysses_degree: int | None = None,
                   seq_dim: int = 1) -> Tensor:
    """This rank's piece of the full sequence ``x`` for context-parallel ``algo`` over ``group``.

    x [..., S, ...] with the sequence along ``seq_dim`` -> [..., S / W, ...]. Raises ValueError when S is
    not a multiple of :func:`required_multiple` (named in the message).
    """
    return shard_for_rank(x, algo, dist.get_world_size(group), dist.get_rank(group), ulysses_degree, seq_dim)


def unshard_sequence(x: Tensor, algo: str, group: dist.ProcessGroup | None = None,
                     ulysses_degree: int | None = None, seq_dim: int = 1) -> Tensor:
    """The full sequence from every rank's piece ``x`` (a collective over ``group``): the inverse of
    :func:`shard_sequence`. x [..., S / W, ...] -> [..., S, ...], the same on every rank."""
    pieces = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return unshard_pieces(pieces, algo, ulysses_degree, seq_dim)
