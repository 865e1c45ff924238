"""Process groups of context-parallel attention.

The hybrid algorithm runs Ulysses inside groups of U consecutive ranks of the context-parallel
group and the ring across the stride-U groups: for CP ranks [0..7] and U = 2 the Ulysses groups are
[0,1] [2,3] [4,5] [6,7] and the ring groups [0,2,4,6] [1,3,5,7]. A trainer that creates every
group on every rank (as Megatron's parallel state does) calls :func:`new_cp_groups` with all CP
groups' ranks; :func:`cp_groups_of` builds this rank's groups on first use from a CP group alone.

Each CP group also has an agreement group (:func:`agreement_group`): the group over which
``cp_attention`` checks, before any exchange, that every rank's inputs are valid. It is the CP group
itself when that runs on gloo, else a gloo group over the same ranks, so the check's small all-reduce
and its read-back stay on the host: on NCCL/HCCL they would cost a device sync per attention call.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

from mm_kernels.parallel.layout import check_ulysses_degree, ulysses_degree_of


def hybrid_group_ranks(cp_ranks: list[int], ulysses_degree: int) -> tuple[list[list[int]], list[list[int]]]:
    """(Ulysses groups, ring groups) of one CP group: groups of ``ulysses_degree`` consecutive ranks, and
    the ranks with the same position in them (stride ``ulysses_degree``). Pure; global ranks in, out."""
    check_ulysses_degree(len(cp_ranks), ulysses_degree)
    ulysses = [list(cp_ranks[i:i + ulysses_degree]) for i in range(0, len(cp_ranks), ulysses_degree)]
    ring = [list(cp_ranks[u::ulysses_degree]) for u in range(ulysses_degree)]
    return ulysses, ring


@dataclasses.dataclass(frozen=True)
class CPGroups:
    """This rank's context-parallel groups.

    ``cp``: the whole CP group; ``ulysses``: the all-to-all group (None when U = 1); ``ring``: the
    ring group (None when the ring has one rank); ``ring_overlap``: a second communicator over the
    ring's ranks so sends and receives run on separate channels (``use_cp_send_recv_overlap``), or None;
    ``agreement``: the CP ranks on gloo (``cp`` itself when it runs on gloo), for the input check.
    """

    cp: dist.ProcessGroup
    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None
    ring_overlap: dist.ProcessGroup | None
    ulysses_degree: int
    agreement: dist.ProcessGroup


def group_timeout(group: dist.ProcessGroup) -> datetime.timedelta | None:
    """The timeout of ``group``'s first backend, or None (the backend default) when it cannot be read."""
    for device_type in group._device_types:
        try:
            return group._get_backend(torch.device(device_type)).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None


def new_cp_groups(cp_rank_lists: list[list[int]], algo: str, ulysses_degree: int | None = None,
                  use_cp_send_recv_overlap: bool = False, timeout: datetime.timedelta | None = None,
                  backend: str | None = None) -> CPGroups:
    """Creates the groups of every CP group (a collective: every rank of the default group calls it with the
    same ``cp_rank_lists``, e.g. [[0, 1, 2, 3], [4, 5, 6, 7]] for CP 4 and DP 2) and returns this rank's.

    On an accelerator backend it also creates a gloo group per CP group, the agreement group.
    Raises ValueError when this rank is in no list or the lists have different sizes.
    """
    sizes = {len(ranks) for ranks in cp_rank_lists}
    if len(sizes) != 1:
        raise ValueError(f"cp_rank_lists must all have one size, got sizes {sorted(sizes)}")
    degree = ulysses_degree_of(algo, sizes.pop(), ulysses_degree)
    me = dist.get_rank()
    mine: dict[str, dist.ProcessGroup | None] = {"ulysses": None, "ring": None, "ring_overlap": None}
    cp = agreement = None
    # Decided from the backend, not from a group: a group this rank is not in has no backend to ask.
    gloo = _is_gloo(backend or dist.get_backend())
    for cp_ranks in cp_rank_lists:
        group = dist.new_group(cp_ranks, timeout=timeout, backend=backend)
        host = group if gloo else dist.new_group(cp_ranks, timeout=timeout, backend="gloo")
        if me in cp_ranks:
            cp, agreement = group, host
        ulysses_lists, ring_lists = hybrid_group_ranks(cp_ranks, degree)
        kinds = [("ulysses", ulysses_lists)] if degree > 1 else []
        if len(ring_lists[0]) > 1:
            kinds.append(("ring", ring_lists))
            if use_cp_send_recv_overlap:
                kinds.append(("ring_overlap", ring_lists))
        for kind, rank_lists in kinds:
            for ranks in rank_lists:
                sub = group if len(ranks) == len(cp_ranks) and kind != "ring_overlap" else dist.new_group(
                    ranks, timeout=timeout, backend=backend)
                if me in ranks:
                    mine[kind] = sub
    if cp is None:
        raise ValueError(f"rank {me} is in none of cp_rank_lists {cp_rank_lists}")
    return CPGroups(cp=cp, ulysses_degree=degree, agreement=agreement, **mine)


def _is_gloo(backend: str) -> bool:
    return backend == "gloo"


_lazy_groups: dict[tuple[str, int], CPGroups] = {}
_lazy_agreement: dict[str, dist.ProcessGroup] = {}


def agreement_group(cp_group: dist.ProcessGroup | CPGroups | None) -> dist.ProcessGroup:
    """The gloo group over ``cp_group``'s ranks (None: the default group): its ``agreement`` for a
    :class:`CPGroups`, the group itself on gloo, else one created on first use by the CP ranks alone
    (every CP rank must make this call, as the first cp_attention call does) and cached. Raises nothing
    about the inputs, so the ranks can agree on them through it."""
    if isinstance(cp_group, CPGroups):
        return cp_group.agreement
    group = cp_group if cp_group is not None else dist.group.WORLD
    if _is_gloo(dist.get_backend(group)):
        return group
    if group.group_name not in _lazy_agreement:
        _lazy_agreement[group.group_name] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                                                           timeout=group_timeout(group),
                                                           use_local_synchronization=True)
    return _lazy_agreement[group.group_name]


def cp_groups_of(cp_group: dist.ProcessGroup | CPGroups | None, algo: str,
                 ulysses_degree: int | None = None) -> CPGroups:
    """This rank's :class:`CPGroups` for ``algo`` over ``cp_group`` (None: the default group).

    A :class:`CPGroups` is returned as it is (its degree must match). From a process group, the hybrid
    sub-groups are created on first use by the CP ranks alone (every CP rank must make this call, as
    the first cp_attention call does) and cached; they take the CP group's timeout.
    """
    if isinstance(cp_group, CPGroups):
        degree = ulysses_degree_of(algo, dist.get_world_size(cp_group.cp), ulysses_degree or cp_group.ulysses_degree)
        if degree != cp_group.ulysses_degree:
            raise ValueError(f"{algo} needs Ulysses degree {degree}, but cp_group was built with "
                             f"{cp_group.ulysses_degree}")
        return cp_group
    group = cp_group if cp_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    degree = ulysses_degree_of(algo, world, ulysses_degree)
    key = (group.group_name, degree)
    if key not in _lazy_groups:
        if 1 < degree < world:
            ulysses_lists, ring_lists = hybrid_group_ranks(dist.get_process_group_ranks(group), degree)
            me = dist.get_rank()
            timeout = group_timeout(group)
            ulysses, ring = (dist.new_group(next(r for r in lists if me in r), timeout=timeout,
                                            use_local_synchronization=True)
                             for lists in (ulysses_lists, ring_lists))
        else:
            ulysses, ring = (group, None) if degree > 1 else (None, group)
        _lazy_groups[key] = CPGroups(cp=group, ulysses=ulysses, ring=ring, ring_overlap=None, ulysses_degree=degree,
                                     agreement=agreement_group(group))
    return _lazy_groups[key]
