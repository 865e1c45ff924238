"""Context-parallel attention (Ulysses, ring, hybrid) and its sequence layouts and process groups."""

from mm_kernels.parallel.api import cp_attention
from mm_kernels.parallel.groups import CPGroups, cp_groups_of, hybrid_group_ranks, new_cp_groups
from mm_kernels.parallel.layout import (
    CP_ALGOS,
    HYBRID,
    RING,
    ULYSSES,
    check_ulysses_degree,
    required_multiple,
    shard_for_rank,
    shard_sequence,
    ulysses_degree_of,
    unshard_pieces,
    unshard_sequence,
)
from mm_kernels.parallel.stats import CPStats, record_cp_stats

__all__ = [
    "CP_ALGOS",
    "CPGroups",
    "CPStats",
    "HYBRID",
    "RING",
    "ULYSSES",
    "check_ulysses_degree",
    "cp_attention",
    "cp_groups_of",
    "hybrid_group_ranks",
    "new_cp_groups",
    "record_cp_stats",
    "required_multiple",
    "shard_for_rank",
    "shard_sequence",
    "ulysses_degree_of",
    "unshard_pieces",
    "unshard_sequence",
]
