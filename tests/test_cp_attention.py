"""Context-parallel attention on spawned gloo groups (2, 3 and 4 ranks) against full attention in one process.

Each world size is spawned once and runs all of its cases; the tests then compare every case's
output and dq/dk/dv (gathered from the ranks' shards) with fp64 attention on the whole sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mm_kernels
from mm_kernels.parallel import (
    HYBRID,
    RING,
    ULYSSES,
    cp_attention,
    hybrid_group_ranks,
    new_cp_groups,
    required_multiple,
    shard_for_rank,
    shard_sequence,
    unshard_pieces,
    unshard_sequence,
)
from mm_kernels.parallel.ulysses import check_ulysses_heads
from tests.distributed import run_ranks
from tests.helpers import relative_error

pytestmark = pytest.mark.distributed

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest error relative to the largest reference value.
TOLERANCE = {"fp64": 1e-9, "fp32": 2e-4, "bf16": 3e-2, "fp16": 5e-3}
BATCH, HEAD_DIM, TOKENS_PER_RANK = 2, 8, 6


@dataclasses.dataclass(frozen=True)
class Case:
    algo: str
    degree: int | None
    causal: bool
    heads_q: int
    heads_kv: int
    dtype: str
    groups: str = "lazy"  # "lazy": a process group; "built": new_cp_groups; "overlap": with the second communicator
    backend: str | None = None

    def __str__(self) -> str:
        algo = self.algo.removesuffix("_cp_algo") + (f"{self.degree}" if self.degree else "")
        extra = "".join(f"-{x}" for x in (self.groups, self.backend) if x not in (None, "lazy"))
        return f"{algo}-{'causal' if self.causal else 'full'}-h{self.heads_q}kv{self.heads_kv}-{self.dtype}{extra}"


def _heads(world: int, algo: str) -> list[tuple[int, int]]:
    """(Hq, Hkv): multi-head, and grouped-query with Hkv < the Ulysses degree (repeated heads) or dividing it."""
    if world == 4:
        return [(4, 4), (8, 2)] if algo != HYBRID else [(4, 4), (4, 2)]
    return [(world, world), (2 * world, 1)]


def _cases(world: int) -> list[Case]:
    algos = [(ULYSSES, None), (RING, None)] + ([(HYBRID, 2)] if world == 4 else [])
    cases = [Case(algo, degree, causal, hq, hkv, dtype)
             for algo, degree in algos for causal in (True, False) for hq, hkv in _heads(world, algo)
             for dtype in DTYPES]
    if world >= 3:
        cases += [Case(RING, None, True, world, 1, dtype, groups="overlap") for dtype in ("fp64", "bf16")]
    if world == 4:
        cases += [Case(HYBRID, 2, True, 4, 2, "fp64", groups="built"), Case(HYBRID, 2, True, 4, 2, "fp64", groups="overlap")]
    if world == 2:
        cases += [Case(algo, None, True, 4, 2, dtype, backend=backend)
                  for algo in (ULYSSES, RING) for dtype in ("fp64", "bf16") for backend in ("reference", "triton")
                  if backend != "triton" or mm_kernels.backends()["triton"]]
    return cases


WORLDS = (2, 3, 4)
ALL_CASES = [(world, case) for world in WORLDS for case in _cases(world)]


def _global_inputs(case: Case, world: int) -> list[torch.Tensor]:
    """q, k, v, dout over the whole sequence, in the case's dtype (the same on every process)."""
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    seq = TOKENS_PER_RANK * world
    shapes = [(case.heads_q,), (case.heads_kv,), (case.heads_kv,), (case.heads_q,)]
    return [torch.randn(BATCH, seq, *h, HEAD_DIM, generator=gen).to(DTYPES[case.dtype]) for h in shapes]


def _run_world(rank: int, world: int, cases: list[Case]) -> dict:
    """Runs every case on this rank; returns its local (out, dq, dk, dv) per case and the layout checks."""
    built = {(c.groups, c.algo): new_cp_groups([list(range(world))], c.algo, c.degree,
                                               use_cp_send_recv_overlap=c.groups == "overlap")
             for c in cases if c.groups != "lazy"}
    shards = {}
    for case in cases:
        group = built.get((case.groups, case.algo))
        q, k, v, dout = (shard_sequence(t, case.algo, None, case.degree) for t in _global_inputs(case, world))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with mm_kernels.use_backend(case.backend):
            out = cp_attention(q, k, v, case.algo, group, case.degree, causal=case.causal)
            out.backward(dout)
        shards[case] = [out.detach(), q.grad, k.grad, v.grad]
    return {"shards": shards, "layout": _layout_checks(world)}


def _layout_checks(world: int) -> dict:
    """Round trips through the collectives, and the errors raised on every rank."""
    algos = [(ULYSSES, None), (RING, None)] + ([(HYBRID, 2)] if world == 4 else [])
    x = torch.randn(3, required_multiple(RING, world) * 3, 5, generator=torch.Generator().manual_seed(0))
    checks = {}
    for algo, degree in algos:
        for seq_dim in (1, -2):
            piece = shard_sequence(x, algo, None, degree, seq_dim=seq_dim)
            checks[f"roundtrip-{algo}-{seq_dim}"] = torch.equal(unshard_sequence(piece, algo, None, degree, seq_dim), x)
        try:
            shard_sequence(x[:, :-1], algo, None, degree)
            checks[f"error-{algo}"] = "no error"
        except ValueError as exc:
            checks[f"error-{algo}"] = str(exc)
    heads_kv = 2 if world == 3 else 3
    kv = torch.zeros(1, 2, heads_kv, 4)
    try:
        cp_attention(torch.zeros(1, 2, heads_kv * world, 4), kv, kv, ULYSSES, None, causal=True)
        checks["error-heads"] = "no error"
    except ValueError as exc:
        checks["error-heads"] = str(exc)
    dist.barrier()
    return checks


@functools.cache
def _spawned(world: int) -> dict:
    per_rank = run_ranks(_run_world, world, _cases(world), timeout=400, collective_timeout=120)
    return {"ranks": per_rank}


def _reference(case: Case, world: int) -> list[torch.Tensor]:
    """fp64 attention over the whole sequence: (out, dq, dk, dv)."""
    q, k, v, dout = _global_inputs(case, world)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=case.causal, enable_gqa=True).transpose(1, 2)
    out.backward(dout.double())
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize(("world", "case"), ALL_CASES, ids=[f"w{w}-{c}" for w, c in ALL_CASES])
def test_cp_attention_matches_full_attention(world: int, case: Case):
    ranks = _spawned(world)["ranks"]
    expected = _reference(case, world)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        pieces = [r["shards"][case][i] for r in ranks]
        assert all(p.dtype == DTYPES[case.dtype] for p in pieces), name
        actual = unshard_pieces(pieces, case.algo, case.degree)
        error = relative_error(actual, expected[i])
        assert error <= TOLERANCE[case.dtype], f"{name}: relative error {error:.2e} > {TOLERANCE[case.dtype]:.0e}"


@pytest.mark.parametrize("world", WORLDS)
def test_layout_round_trips_and_errors_on_every_rank(world: int):
    for rank, result in enumerate(_spawned(world)["ranks"]):
        checks = result["layout"]
        for name, value in checks.items():
            if name.startswith("roundtrip"):
                assert value is True, f"rank {rank}: {name}"
        assert f"multiple of {2 * world}" in checks[f"error-{RING}"]
        assert f"multiple of {world}" in checks[f"error-{ULYSSES}"]
        if world == 4:
            assert "multiple of 4" in checks[f"error-{HYBRID}"]
        heads_kv = 2 if world == 3 else 3
        assert f"key/value heads Hkv={heads_kv} must be divisible by the Ulysses degree" in checks["error-heads"]


def _fail_or_wait(rank: int, world: int) -> None:
    """Rank 0 waits for a message that rank 1 never sends (rank 1 gives up after rank 0's timeout)."""
    if rank == 1:
        time.sleep(8)
        raise ValueError("rank 1 gave up")
    dist.irecv(torch.empty(4), src=1).wait()


def test_a_missing_peer_times_out_instead_of_hanging():
    with pytest.raises(RuntimeError) as info:
        run_ranks(_fail_or_wait, 2, timeout=120, collective_timeout=3)
    message = str(info.value)
    assert "rank 1 gave up" in message
    assert "rank 0 failed" in message and "Timed out" in message


def test_zigzag_and_hybrid_layouts_place_the_expected_positions():
    seq = torch.arange(8).view(1, 8)
    assert [shard_for_rank(seq, RING, 2, r).tolist() for r in range(2)] == [[[0, 1, 6, 7]], [[2, 3, 4, 5]]]
    assert [shard_for_rank(seq, ULYSSES, 2, r).tolist() for r in range(2)] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    hybrid = [shard_for_rank(seq, HYBRID, 4, r, ulysses_degree=2).tolist() for r in range(4)]
    assert hybrid == [[[0, 1]], [[6, 7]], [[2, 3]], [[4, 5]]]


@pytest.mark.parametrize(("algo", "world", "degree"), [
    (ULYSSES, 3, None), (RING, 3, None), (RING, 4, None), (HYBRID, 4, 2), (HYBRID, 6, 3), (HYBRID, 6, 2),
    (HYBRID, 4, 4), (HYBRID, 4, 1),
])
def test_shard_then_unshard_is_exact(algo: str, world: int, degree: int | None):
    multiple = required_multiple(algo, world, degree)
    x = torch.randn(2, 3 * multiple, 3)
    pieces = [shard_for_rank(x, algo, world, r, degree) for r in range(world)]
    assert all(p.shape == (2, 3 * multiple // world, 3) for p in pieces)
    assert torch.equal(unshard_pieces(pieces, algo, degree), x)
    assert sorted(torch.cat([shard_for_rank(torch.arange(3 * multiple), algo, world, r, degree, seq_dim=0)
                             for r in range(world)]).tolist()) == list(range(3 * multiple))


def test_required_multiples_and_their_errors():
    assert required_multiple(ULYSSES, 3) == 3
    assert required_multiple(RING, 3) == 6
    assert required_multiple(HYBRID, 4, 2) == 4
    assert required_multiple(HYBRID, 6, 3) == 12
    with pytest.raises(ValueError, match="multiple of 12, got 18"):
        shard_for_rank(torch.zeros(1, 18), HYBRID, 6, 0, ulysses_degree=3)
    with pytest.raises(ValueError, match="ulysses_degree dividing the context-parallel size 4, got 3"):
        required_multiple(HYBRID, 4, 3)
    with pytest.raises(ValueError, match="algo must be one of"):
        required_multiple("ring", 2)


def test_hybrid_groups_are_consecutive_ulysses_and_strided_ring():
    ulysses, ring = hybrid_group_ranks(list(range(8)), 2)
    assert ulysses == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ring == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert hybrid_group_ranks([4, 5, 6, 7], 4) == ([[4, 5, 6, 7]], [[4], [5], [6], [7]])
    with pytest.raises(ValueError, match="ulysses_degree dividing the context-parallel size 3, got 2"):
        hybrid_group_ranks([0, 1, 2], 2)


def _groups_of_two_cp_groups(rank: int, world: int) -> tuple[list[int], bool]:
    groups = new_cp_groups([[0, 1], [2, 3]], ULYSSES)
    return dist.get_process_group_ranks(groups.cp), groups.agreement is groups.cp


@pytest.mark.distributed
def test_new_cp_groups_with_a_cp_group_this_rank_is_not_in():
    outcomes = run_ranks(_groups_of_two_cp_groups, 4, timeout=120)
    assert outcomes == [([0, 1], True), ([0, 1], True), ([2, 3], True), ([2, 3], True)]


def test_ulysses_head_checks():
    check_ulysses_heads(8, 2, 4)
    check_ulysses_heads(8, 8, 4)
    with pytest.raises(ValueError, match="query heads Hq=6 must be divisible by the Ulysses degree 4"):
        check_ulysses_heads(6, 2, 4)
    with pytest.raises(ValueError, match="key/value heads Hkv=3"):
        check_ulysses_heads(12, 3, 4)


def _agreement_on_a_side_group(rank: int, world: int) -> dict:
    """CP groups taken for accelerator groups (NCCL/HCCL cannot run here): the input check goes over a
    separate gloo group, for groups from new_cp_groups and for a plain process group alike."""
    from mm_kernels.parallel import groups as cp_groups

    cp_groups._is_gloo = lambda backend: False
    built = new_cp_groups([list(range(world))], ULYSSES)
    plain = dist.new_group(list(range(world)))
    side = cp_groups.agreement_group(plain)
    outcome = {"separate": built.agreement is not built.cp and side is not plain,
               "cached": cp_groups.agreement_group(plain) is side,
               "gloo": dist.get_backend(built.agreement) == dist.get_backend(side) == "gloo"}
    q = torch.randn(1, 4, 2, 8, generator=torch.Generator().manual_seed(rank))
    outcome["good"] = cp_attention(q, q, q, ULYSSES, built).shape == q.shape
    for name, group in (("built", built), ("plain", plain)):
        bad = q[..., :4] if rank == 1 else q
        start = time.monotonic()
        try:
            cp_attention(bad, q, q, RING, group)
            outcome[name] = ("no error", 0.0)
        except ValueError as error:
            outcome[name] = (str(error), time.monotonic() - start)
    return outcome


@pytest.mark.distributed
def test_input_agreement_of_an_accelerator_cp_group_runs_on_a_gloo_side_group():
    for rank, outcome in enumerate(run_ranks(_agreement_on_a_side_group, 2, timeout=300, collective_timeout=60)):
        assert outcome["separate"] and outcome["cached"] and outcome["gloo"] and outcome["good"], outcome
        for name in ("built", "plain"):
            error, seconds = outcome[name]
            assert seconds < 20, f"rank {rank} {name}: waited for its peer"
            expected = "k must have shape" if rank == 1 else "cp_attention: rank 1 of the context-parallel group"
            assert error.startswith(expected), (rank, name, error)
