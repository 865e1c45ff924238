"""Context parallelism: flags, their checks, :class:`ContextParallelConfig`, the sequence padding
rule (:func:`sequence_multiple`), the process groups, and megatron-core's attention, rotary embedding,
micro-batches and loss made to work on a sequence sharded over CP ranks.

With ``--context-parallel-size`` C > 1 every micro-batch is cut along the sequence in the layout of
``--context-parallel-algo`` (:mod:`mm_kernels.parallel.layout`); each CP rank runs the model on its
piece. Megatron's local attention refuses CP, so the layer spec's core attention becomes
:class:`ContextParallelAttention` (``mm_kernels.parallel.cp_attention``); the rotary embedding
gives each local token the angle of its global position. The per-token losses of the CP ranks are
gathered before the loss mode reduces them, so every CP rank computes the CP=1 objective; its
backward hands each rank C times its tokens' gradient, which megatron's DDP divides out when it
averages gradients over the data-parallel-with-context group (DP x CP). With C = 1 nothing here runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from mm_kernels.integrations.megatron import core_attention_spec
from mm_kernels.parallel import (
    CP_ALGOS,
    HYBRID,
    ULYSSES,
    CPGroups,
    cp_attention,
    new_cp_groups,
    required_multiple,
    shard_for_rank,
    ulysses_degree_of,
)
from mm_kernels.parallel.ulysses import check_ulysses_heads
from mm_train.errors import ConfigError
from mm_train.features import positive_int
from mm_train.loss import micro_batch_loss

ATTENTION_MASK_TYPES = ("causal", "general")


@dataclasses.dataclass(frozen=True)
class ContextParallelConfig:
    """Context parallelism of the run: ``size`` 1 means off. ``ulysses_degree`` is resolved: the CP
    size for Ulysses, 1 for the ring, --ulysses-degree-in-cp for hybrid."""

    size: int = 1
    algo: str = ULYSSES
    ulysses_degree: int = 1
    use_cp_send_recv_overlap: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --context-parallel-size, --context-parallel-algo, --ulysses-degree-in-cp,
    --attention-mask-type (alias --cp-attention-mask-type) and --use-cp-send-recv-overlap."""
    group = parser.add_argument_group("context parallel")
    group.add_argument("--context-parallel-size", type=positive_int, default=1,
                       help="ranks one sequence is split over")
    group.add_argument("--context-parallel-algo", default=ULYSSES, choices=CP_ALGOS)
    group.add_argument("--ulysses-degree-in-cp", type=positive_int, default=None,
                       help="hybrid_cp_algo: ranks of one Ulysses group (the ring spans the rest)")
    group.add_argument("--attention-mask-type", "--cp-attention-mask-type", dest="attention_mask_type",
                       default="causal", choices=ATTENTION_MASK_TYPES,
                       help="accepted as MindSpeed's: the GPT model's attention is causal either way (general "
                            "is named in a start-up notice)")
    group.add_argument("--use-cp-send-recv-overlap", action="store_true",
                       help="ring attention sends and receives on two communicators")


def sequence_multiple(cp: ContextParallelConfig, tensor_model_parallel_size: int, sequence_parallel: bool) -> int:
    """The one padding rule: every (padded) sequence length is a multiple of this. The CP layout's
    multiple (:func:`mm_kernels.parallel.required_multiple`: C for Ulysses, 2C for the ring, ...), and
    C x TP under sequence parallelism (each CP piece is split again over TP)."""
    multiple = required_multiple(cp.algo, cp.size, cp.ulysses_degree) if cp.size > 1 else 1
    if sequence_parallel:
        multiple = math.lcm(multiple, cp.size * tensor_model_parallel_size)
    return multiple


def _ulysses_degree(args: argparse.Namespace) -> int:
    cp, degree = args.context_parallel_size, args.ulysses_degree_in_cp
    if cp == 1:
        return 1
    if args.context_parallel_algo == HYBRID and degree is None:
        raise ConfigError("--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp")
    try:
        return ulysses_degree_of(args.context_parallel_algo, cp, degree)
    except ValueError:
        raise ConfigError(f"--ulysses-degree-in-cp {degree} must divide --context-parallel-size {cp} for "
                          "hybrid_cp_algo") from None


def check(args: argparse.Namespace) -> None:
    """MindSpeed's context-parallel checks (run after the TP/PP/CP layout check and the defaults).

    Raises ConfigError with one line: bad Ulysses degree, heads or sequence length the
    algorithm cannot split, attention dropout (the CP attention kernels have none).
    """
    cp, tp = args.context_parallel_size, args.tensor_model_parallel_size
    if cp == 1:
        return
    algo = args.context_parallel_algo
    degree = _ulysses_degree(args)
    if degree > 1:
        heads, groups = args.num_attention_heads, args.num_query_groups
        if heads % (degree * tp):
            raise ConfigError(f"--num-attention-heads {heads} must be divisible by Ulysses degree x TP = "
                              f"{degree} x {tp} for {algo}")
        try:
            check_ulysses_heads(heads // tp, groups // tp, degree)
        except ValueError as error:
            raise ConfigError(f"{algo} with --num-query-groups {groups}: {error}") from None
    multiple = sequence_multiple(to_config(args), tp, args.sequence_parallel)
    if not args.variable_seq_lengths and args.seq_length % multiple:
        raise ConfigError(f"--seq-length {args.seq_length} must be a multiple of {multiple} for {algo} on "
                          f"--context-parallel-size {cp}" + (" with sequence parallel" if args.sequence_parallel
                                                             else ""))
    if args.attention_dropout > 0:
        raise ConfigError(f"--attention-dropout {args.attention_dropout} must be 0 with --context-parallel-size "
                          f"{cp} (the context-parallel attention has no dropout)")


def notices(args: argparse.Namespace) -> list[str]:
    """--attention-mask-type general has no effect: the GPT model's attention is causal, and the kernels
    never build a mask."""
    if args.attention_mask_type == "causal":
        return []
    return [f"--attention-mask-type {args.attention_mask_type} has no effect here: the GPT model's attention is "
            "causal (the kernels never build a mask)"]


def to_config(args: argparse.Namespace) -> ContextParallelConfig:
    """The :class:`ContextParallelConfig` of the flags (ConfigError for a bad hybrid degree)."""
    return ContextParallelConfig(size=args.context_parallel_size, algo=args.context_parallel_algo,
                                 ulysses_degree=_ulysses_degree(args), use_cp_send_recv_overlap=args.use_cp_send_recv_overlap)


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """This rank's context-parallel setting: algorithm, CP size and rank, Ulysses degree and groups."""

    algo: str
    size: int
    rank: int
    ulysses_degree: int
    groups: CPGroups

    def shard(self, x: Tensor, seq_dim: int = 1) -> Tensor:
        """This rank's piece of the full sequence ``x`` (sequence along ``seq_dim``) in the algo's layout."""
        return shard_for_rank(x, self.algo, self.size, self.rank, self.ulysses_degree, seq_dim)


def all_cp_rank_lists() -> list[list[int]]:
    """The global ranks of every CP group of megatron's parallel state (a collective over all ranks)."""
    mine = parallel_state.get_context_parallel_global_ranks()
    gathered: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(mine))
    return sorted({tuple(ranks) for ranks in gathered})


def set_up_context_parallel(config: ContextParallelConfig, timeout: timedelta) -> ContextParallel | None:
    """Creates the CP attention groups over megatron's CP groups on every rank (a collective);
    None when the CP size is 1."""
    if config.size == 1:
        return None
    groups = new_cp_groups([list(ranks) for ranks in all_cp_rank_lists()], config.algo, config.ulysses_degree,
                           use_cp_send_recv_overlap=config.use_cp_send_recv_overlap, timeout=timeout)
    return ContextParallel(config.algo, dist.get_world_size(groups.cp), dist.get_rank(groups.cp),
                           config.ulysses_degree, groups)


class ContextParallelAttention(MegatronModule):
    """megatron-core core attention over a CP-sharded sequence: ``mm_kernels.parallel.cp_attention``.

    Takes megatron's query [s, b, np, hn] and key/value [s, b, ng, hn] (this rank's s = S / C tokens,
    its TP share of heads) and returns the context [s, b, np * hn]. Causal when the layer's mask type
    is causal; an explicit attention mask tensor is refused (the GPT model passes none).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 cp_comm_type: str | None = None, softmax_scale: float | None = None, pg_collection=None,
                 context_parallel: ContextParallel | None = None):
        super().__init__(config=config)
        if context_parallel is None:
            raise ValueError("ContextParallelAttention needs the context_parallel setting")
        if config.apply_query_key_layer_scaling:
            raise ValueError("ContextParallelAttention does not support apply_query_key_layer_scaling")
        self.context_parallel = context_parallel
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        """Attention over the whole sequence for this rank's queries; [s, b, np, hn] -> [s, b, np * hn]."""
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("context-parallel attention takes no attention mask, bias or packed sequences")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        cp = self.context_parallel
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))
        out = cp_attention(q, k, v, cp.algo, cp.groups, cp.ulysses_degree, causal=mask_type == AttnMaskType.causal,
                           softmax_scale=self.softmax_scale)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)


def context_parallel_layer_spec(spec: ModuleSpec, context_parallel: ContextParallel | None) -> ModuleSpec:
    """``spec`` (a TransformerLayer spec) with :class:`ContextParallelAttention` as its core attention;
    ``spec`` itself when ``context_parallel`` is None."""
    if context_parallel is None:
        return spec
    return core_attention_spec(spec, ContextParallelAttention, {"context_parallel": context_parallel})


class GlobalPositionRotaryEmbedding(torch.nn.Module):
    """megatron-core's RotaryEmbedding for a CP-sharded sequence: the angles of the whole sequence,
    then the rows of this rank's tokens in the algo's layout (megatron's own slicing knows only the
    ring's zigzag). No parameters or buffers, so checkpoints are unchanged."""

    def __init__(self, rotary: torch.nn.Module, context_parallel: ContextParallel):
        super().__init__()
        self.rotary = rotary
        self.context_parallel = context_parallel

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        """The global sequence length (megatron multiplies the local one by the CP size)."""
        return self.rotary.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> Tensor:
        """Angles [s, 1, 1, dim] of this rank's s = max_seq_len / C tokens."""
        if packed_seq:
            raise ValueError("context-parallel rotary embedding does not support packed sequences")
        return self.context_parallel.shard(self.rotary.get_emb(max_seq_len, offset), seq_dim=0)


def use_global_rope_positions(model: torch.nn.Module, context_parallel: ContextParallel | None) -> None:
    """Replaces a GPTModel's rotary embedding by :class:`GlobalPositionRotaryEmbedding` (in place)."""
    if context_parallel is not None and getattr(model, "rotary_pos_emb", None) is not None:
        model.rotary_pos_emb = GlobalPositionRotaryEmbedding(model.rotary_pos_emb, context_parallel)


def shard_batch(batch: dict, context_parallel: ContextParallel | None) -> dict:
    """This rank's piece of a micro-batch (tokens, labels, loss_mask, position_ids [b, S] -> [b, S / C]);
    position_ids keep the global positions. The batch itself when ``context_parallel`` is None."""
    if context_parallel is None:
        return batch
    return {name: context_parallel.shard(value) for name, value in batch.items()}


class _GatherSequence(torch.autograd.Function):
    """[b, s] pieces of the CP ranks -> [b, C * s] in rank order; the backward sums the gradients of
    every rank's copy and returns this rank's piece."""

    @staticmethod
    def forward(ctx, piece: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        gathered = piece.new_empty((size * piece.shape[0], piece.shape[1]))
        dist.all_gather_into_tensor(gathered, piece.contiguous(), group=group)
        return gathered.view(size, *piece.shape).transpose(0, 1).reshape(piece.shape[0], -1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.view(grad.shape[0], size, -1)[:, rank], None


def gather_sequence(piece: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The CP ranks' [b, s] pieces side by side, [b, C * s] (differentiable; every CP rank must call it)."""
    return _GatherSequence.apply(piece, group)


def _cp_micro_batch_loss(mode: str, loss_mask: Tensor, group: dist.ProcessGroup, token_loss: Tensor):
    return micro_batch_loss(mode, gather_sequence(loss_mask, group), gather_sequence(token_loss, group))


def cp_loss_function(mode: str, loss_mask: Tensor, context_parallel: ContextParallel):
    """The megatron-core loss_func of a CP micro-batch: :func:`mm_train.loss.micro_batch_loss` over the
    token losses and ``loss_mask`` [b, S / C] of every CP rank, so value, divisor and report are those
    of the whole sequence on each CP rank."""
    return partial(_cp_micro_batch_loss, mode, loss_mask, context_parallel.groups.cp)
