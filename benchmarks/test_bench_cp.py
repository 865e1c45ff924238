"""Context-parallel attention benchmark smoke test: one small ring run on two spawned ranks."""

import pytest

from mm_kernels.bench.cp import CPBenchConfig, measure
from mm_kernels.parallel import RING


@pytest.mark.distributed
def test_bench_cp_ring_two_ranks(benchmark):
    config = CPBenchConfig(batch=1, seq=64, heads=2, kv_heads=2, head_dim=16, dtype="fp32", causal=True, reps=2)
    result = benchmark.pedantic(measure, args=(RING, 2, None, config), rounds=1, iterations=1)
    assert result.ms > 0
    assert len(result.compute_ms_per_rank) == 2 and all(c > 0 for c in result.compute_ms_per_rank)
    # Forward: one K/V block; backward: one K/V block and two fp32 dK/dV accumulators (32 tokens, 2 heads, dim 16).
    block = 32 * 2 * 16 * 4 * 2
    assert result.bytes_sent_per_rank == [4 * block, 4 * block]
