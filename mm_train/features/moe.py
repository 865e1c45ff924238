"""Mixture of experts: flags, their checks, :class:`MoEConfig`, megatron-core's MoE config, the
layout-independent initialisation of expert weights, and the aux-loss figures of the log line.

Every MoE layer is megatron-core's ``MoELayer``: a top-k router (optionally group-limited), the
allgather or alltoall token dispatcher (``alltoall_seq``, Megatron 0.12's variant, runs as alltoall),
``SequentialMLP`` experts (one megatron MLP per expert) or, with ``--moe-grouped-gemm``, the legacy
``GroupedMLP``, and optionally shared experts (``--n-shared-experts`` /
``--moe-shared-expert-intermediate-size``). Which layers are MoE: ``--moe-layer-freq`` (Megatron: every
N-th layer, or a list such as ``[0]*1+[1]*3``), or MindSpeed-LLM's ``--first-k-dense-replace K
--moe-layer-freq F`` (layer i is MoE when i >= K and i % F == 0; ``-1 -1`` makes every layer MoE).
Experts are sharded over ``--expert-model-parallel-size`` ranks and not over tensor
parallelism (expert TP = 1).

Expert ``e`` (global index, whichever rank holds it) is drawn exactly like a dense MLP called
``...mlp.experts.local_experts.e`` would be, so EP = 1 and EP = 2 build the same full model and
the grouped weights hold the same numbers as the sequential ones.
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from mm_train.errors import ConfigError
from mm_train.features import fields_from, flag, non_negative, positive, positive_int, ranged

_LOCAL_EXPERT = re.compile(r"experts\.local_experts\.(\d+)\.")
_GROUPED_WEIGHT = re.compile(r"experts\.weight([12])$")

# Flags that only mean something with --num-experts: (attribute, value meaning "not set").
_NEEDS_EXPERTS = (
    ("expert_model_parallel_size", 1),
    ("moe_permute_fusion", False),
    ("moe_grouped_gemm", False),
    ("moe_expert_capacity_factor", None),
    ("moe_pad_expert_input_to_capacity", False),
    ("moe_ffn_hidden_size", None),
    ("moe_layer_freq", 1),
    ("first_k_dense_replace", None),
    ("n_shared_experts", None),
    ("moe_shared_expert_intermediate_size", None),
    ("moe_router_topk_scaling_factor", None),
    ("moe_router_num_groups", None),
    ("moe_router_group_topk", None),
    ("seq_aux", False),
)


@dataclass(frozen=True)
class MoEConfig:
    """The MoE flags of a model with experts (``moe_ffn_hidden_size`` resolved to --ffn-hidden-size when
    unset). ``moe_permute_fusion`` routes the dispatcher's permute/unpermute to mm_kernels.
    ``moe_layer_pattern``: 1 for each MoE layer, 0 for a dense one (one entry per layer);
    ``moe_shared_expert_intermediate_size``: FFN width of the shared experts (None: none)."""

    num_experts: int
    moe_ffn_hidden_size: int
    moe_router_topk: int
    moe_router_load_balancing_type: str
    moe_aux_loss_coeff: float
    expert_model_parallel_size: int
    moe_token_dispatcher_type: str
    moe_permute_fusion: bool
    moe_grouped_gemm: bool
    moe_expert_capacity_factor: float | None
    moe_pad_expert_input_to_capacity: bool
    moe_token_drop_policy: str
    moe_layer_pattern: tuple[int, ...] = ()
    moe_shared_expert_intermediate_size: int | None = None
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None

    @property
    def num_moe_layers(self) -> int:
        """How many layers have experts."""
        return sum(self.moe_layer_pattern)


def _int_constant(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    raise ValueError("not an integer")


def _int_list(node: ast.AST) -> list[int]:
    """Value of a list expression made of integer lists, + and * (Megatron's "[0]*1+[1]*3")."""
    if isinstance(node, ast.List):
        return [_int_constant(element) for element in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _int_list(node.left) + _int_list(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        if isinstance(node.left, ast.Constant):
            return _int_list(node.right) * _int_constant(node.left)
        return _int_list(node.left) * _int_constant(node.right)
    raise ValueError("not a list expression")


def layer_freq(text: str) -> int | list[int]:
    """--moe-layer-freq: an integer, or a list expression of 0 (dense) and 1 (MoE) per layer."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return _int_list(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor a list such as [0]*1+[1]*3") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """MoE flags with Megatron's names and defaults (MindSpeed-MM's MOE_ARGS)."""
    group = parser.add_argument_group("mixture of experts")
    group.add_argument("--num-experts", type=positive_int, default=None, help="experts per MoE layer (every layer)")
    group.add_argument("--moe-ffn-hidden-size", type=positive_int, default=None, help="default: --ffn-hidden-size")
    group.add_argument("--moe-router-topk", type=positive_int, default=2)
    group.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                       choices=["aux_loss", "seq_aux_loss", "none"])
    group.add_argument("--seq-aux", action="store_true", help="MindSpeed-LLM's name for seq_aux_loss balancing")
    group.add_argument("--moe-aux-loss-coeff", type=non_negative, default=0.0)
    group.add_argument("--moe-router-topk-scaling-factor", type=positive, default=None,
                       help="multiplies the routing weights of the top-k experts")
    group.add_argument("--moe-router-num-groups", type=positive_int, default=None,
                       help="group-limited routing: experts in this many groups")
    group.add_argument("--moe-router-group-topk", type=positive_int, default=None,
                       help="group-limited routing: top-k experts only from this many best groups")
    group.add_argument("--moe-layer-freq", type=layer_freq, default=1,
                       help="every N-th layer is MoE, or a list of 0/1 per layer such as [0]*1+[1]*3")
    group.add_argument("--first-k-dense-replace", type=ranged(int, -1), default=None,
                       help="MindSpeed-LLM: layer i is MoE when i >= K and i %% --moe-layer-freq == 0")
    group.add_argument("--n-shared-experts", type=positive_int, default=None,
                       help="shared experts of width N x --moe-ffn-hidden-size (unless "
                            "--moe-shared-expert-intermediate-size)")
    group.add_argument("--moe-shared-expert-intermediate-size", type=positive_int, default=None,
                       help="FFN width of the shared experts")
    group.add_argument("--expert-model-parallel-size", type=positive_int, default=1)
    group.add_argument("--moe-token-dispatcher-type", default="allgather",
                       choices=["allgather", "alltoall", "alltoall_seq"],
                       help="alltoall_seq (Megatron 0.12) runs megatron-core's alltoall")
    group.add_argument("--moe-permute-fusion", action="store_true",
                       help="mm_kernels permute/unpermute in the alltoall dispatcher")
    group.add_argument("--moe-grouped-gemm", action="store_true",
                       help="all local experts in one grouped GEMM (megatron's GroupedMLP; needs --bf16)")
    group.add_argument("--moe-expert-capacity-factor", type=positive, default=None,
                       help="drop tokens beyond capacity = factor x tokens x topk / experts")
    group.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                       help="pad every expert's input to its capacity (needs --moe-expert-capacity-factor)")
    group.add_argument("--moe-token-drop-policy", default="probs", choices=["probs", "position"])


def check(args: argparse.Namespace, tp_cp_dp_size: int) -> None:
    """Refuses inconsistent MoE flags (ConfigError, one line). ``tp_cp_dp_size`` = world size / PP."""
    if args.num_experts is None:
        for name, unset in _NEEDS_EXPERTS:
            if vars(args)[name] != unset:
                raise ConfigError(f"{flag(name)} needs --num-experts")
        return
    experts, topk, ep = args.num_experts, args.moe_router_topk, args.expert_model_parallel_size
    if not 1 <= topk <= experts:
        raise ConfigError(f"--moe-router-topk {topk} must be in [1, --num-experts {experts}]")
    if experts % ep:
        raise ConfigError(f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}")
    if tp_cp_dp_size % ep:
        raise ConfigError(f"--expert-model-parallel-size {ep} does not divide TP x CP x DP = {tp_cp_dp_size}")
    if args.use_torch_fsdp2:
        raise ConfigError("--num-experts with --use-torch-fsdp2 is not yet supported by mm-train")
    tp = args.tensor_model_parallel_size
    if tp > 1 and not args.sequence_parallel:
        raise ConfigError("--num-experts with --tensor-model-parallel-size > 1 needs --sequence-parallel "
                          "(megatron-core's MoE layer refuses it otherwise)")
    if tp > 1 and ep > 1:
        raise ConfigError("--expert-model-parallel-size > 1 with --tensor-model-parallel-size > 1 is not yet "
                          "supported by mm-train")
    if args.moe_permute_fusion and _dispatcher(args) != "alltoall":
        raise ConfigError("--moe-permute-fusion needs --moe-token-dispatcher-type alltoall "
                          f"(got {args.moe_token_dispatcher_type})")
    if args.moe_pad_expert_input_to_capacity and args.moe_expert_capacity_factor is None:
        raise ConfigError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    if args.moe_grouped_gemm and not args.bf16:
        raise ConfigError("--moe-grouped-gemm needs --bf16 (megatron-core's GroupedMLP runs bf16 only)")
    if not args.disable_bias_linear:
        raise ConfigError("--num-experts needs --disable-bias-linear: megatron-core's local expert MLPs cannot "
                          "train their linear biases (an in-place add on a tensor-parallel output fails)")
    if args.variable_seq_lengths and args.moe_token_dispatcher_type == "allgather":
        raise ConfigError("--variable-seq-lengths with --num-experts needs --moe-token-dispatcher-type alltoall")
    _check_layer_pattern(args)
    _check_router_groups(args)


def _dispatcher(args: argparse.Namespace) -> str:
    return "alltoall" if args.moe_token_dispatcher_type == "alltoall_seq" else args.moe_token_dispatcher_type


def _layer_pattern(args: argparse.Namespace) -> tuple[int, ...]:
    """1 for each MoE layer (see the module doc for the two conventions)."""
    layers, freq, first_dense = args.num_layers, args.moe_layer_freq, args.first_k_dense_replace
    if isinstance(freq, list):
        return tuple(freq)
    if freq == 0:
        raise ConfigError("--moe-layer-freq must not be 0")
    return tuple(int(i >= (first_dense or 0) and i % freq == 0) for i in range(layers))


def _check_layer_pattern(args: argparse.Namespace) -> None:
    layers, pp = args.num_layers, args.pipeline_model_parallel_size
    if isinstance(args.moe_layer_freq, list):
        if args.first_k_dense_replace is not None:
            raise ConfigError("--first-k-dense-replace needs an integer --moe-layer-freq")
        if len(args.moe_layer_freq) != layers or set(args.moe_layer_freq) - {0, 1}:
            raise ConfigError(f"--moe-layer-freq as a list needs {layers} entries of 0 (dense) or 1 (MoE), one per "
                              "layer")
    if args.first_k_dense_replace is not None and args.first_k_dense_replace >= layers:
        raise ConfigError(f"--num-layers {layers} must be greater than --first-k-dense-replace "
                          f"{args.first_k_dense_replace}")
    pattern = _layer_pattern(args)
    per_stage = layers // pp
    for stage in range(pp):
        if not any(pattern[stage * per_stage:(stage + 1) * per_stage]):
            where = "the model" if pp == 1 else f"pipeline stage {stage} (layers {stage * per_stage} to " \
                                                f"{(stage + 1) * per_stage - 1})"
            raise ConfigError(f"--moe-layer-freq / --first-k-dense-replace leave no MoE layer in {where}")


def _check_router_groups(args: argparse.Namespace) -> None:
    groups, group_topk, experts = args.moe_router_num_groups, args.moe_router_group_topk, args.num_experts
    if (groups is None) != (group_topk is None):
        raise ConfigError("--moe-router-num-groups and --moe-router-group-topk go together (group-limited routing)")
    if groups is None:
        return
    if experts % groups:
        raise ConfigError(f"--moe-router-num-groups {groups} must divide --num-experts {experts}")
    if not 1 <= group_topk <= groups:
        raise ConfigError(f"--moe-router-group-topk {group_topk} must be in [1, --moe-router-num-groups {groups}]")
    if args.moe_router_topk > group_topk * (experts // groups):
        raise ConfigError(f"--moe-router-topk {args.moe_router_topk} exceeds the {group_topk * (experts // groups)} "
                          "experts of the selected groups")


def notices(args: argparse.Namespace) -> list[str]:
    """A line when Megatron 0.12's alltoall_seq dispatcher runs as megatron-core's alltoall."""
    if args.num_experts is not None and args.moe_token_dispatcher_type == "alltoall_seq":
        return ["--moe-token-dispatcher-type alltoall_seq runs megatron-core's alltoall dispatcher (it replaced "
                "alltoall_seq after Megatron 0.12)"]
    return []


def to_config(args: argparse.Namespace) -> MoEConfig | None:
    """The :class:`MoEConfig` of the (checked) flags; None for a dense model."""
    if args.num_experts is None:
        return None
    ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size
    shared = args.moe_shared_expert_intermediate_size
    if shared is None and args.n_shared_experts is not None:
        shared = args.n_shared_experts * ffn
    balancing = "seq_aux_loss" if args.seq_aux else args.moe_router_load_balancing_type
    return fields_from(MoEConfig, args, moe_ffn_hidden_size=ffn, moe_token_dispatcher_type=_dispatcher(args),
                       moe_router_load_balancing_type=balancing, moe_layer_pattern=_layer_pattern(args),
                       moe_shared_expert_intermediate_size=shared)


def transformer_config_kwargs(moe: MoEConfig | None) -> dict:
    """TransformerConfig keyword arguments of the MoE flags (empty for a dense model).

    megatron's own ``moe_permute_fusion`` stays False: our flag swaps the permute functions
    instead (see :func:`mm_kernels.integrations.megatron.apply_fused_kernels`).
    """
    if moe is None:
        return {}
    return {
        "num_moe_experts": moe.num_experts,
        "moe_ffn_hidden_size": moe.moe_ffn_hidden_size,
        "moe_router_topk": moe.moe_router_topk,
        "moe_router_load_balancing_type": moe.moe_router_load_balancing_type,
        "moe_aux_loss_coeff": moe.moe_aux_loss_coeff,
        "expert_model_parallel_size": moe.expert_model_parallel_size,
        "expert_tensor_parallel_size": 1,
        "moe_token_dispatcher_type": moe.moe_token_dispatcher_type,
        "moe_grouped_gemm": moe.moe_grouped_gemm,
        "moe_expert_capacity_factor": moe.moe_expert_capacity_factor,
        "moe_pad_expert_input_to_capacity": moe.moe_pad_expert_input_to_capacity,
        "moe_token_drop_policy": moe.moe_token_drop_policy,
        "moe_permute_fusion": False,
        "moe_layer_freq": list(moe.moe_layer_pattern),
        "moe_shared_expert_intermediate_size": moe.moe_shared_expert_intermediate_size,
        "moe_router_topk_scaling_factor": moe.moe_router_topk_scaling_factor,
        "moe_router_num_groups": moe.moe_router_num_groups,
        "moe_router_group_topk": moe.moe_router_group_topk,
    }


def is_expert_parameter(name: str) -> bool:
    """True for the weights of routed experts (sequential or grouped), not the router."""
    return bool(_LOCAL_EXPERT.search(name) or _GROUPED_WEIGHT.search(name))


def _global_expert(local: int, num_local: int) -> int:
    return parallel_state.get_expert_model_parallel_rank() * num_local + local


def expert_full_value(name: str, param: torch.nn.Parameter, num_local_experts: int, hidden: int, draw) -> torch.Tensor:
    """The value of expert parameter ``name`` on this rank, from ``draw(global name, shape)``.

    ``name`` is already a global-layer name. A ``experts.local_experts.i`` weight is drawn as
    ``experts.local_experts.{global index of i}``. A grouped ``weight1`` [H, n*F1] / ``weight2`` [n*F, H]
    packs, for each local expert e, the transpose of the sequential fc1 [F1, H] / fc2 [H, F]
    weight of expert e (GroupedMLP views the flat memory as [n, H, F1] and [n, F, H]).
    """
    local = _LOCAL_EXPERT.search(name)
    if local:
        expert = _global_expert(int(local.group(1)), num_local_experts)
        return draw(name[:local.start()] + f"experts.local_experts.{expert}." + name[local.end():],
                    list(param.shape))
    grouped = _GROUPED_WEIGHT.search(name)
    prefix = name[:grouped.start()] + "experts.local_experts."
    if grouped.group(1) == "1":
        fc, shape = "linear_fc1", [param.shape[1] // num_local_experts, hidden]
    else:
        fc, shape = "linear_fc2", [hidden, param.shape[0] // num_local_experts]
    blocks = [draw(f"{prefix}{_global_expert(e, num_local_experts)}.{fc}.weight", shape).t().reshape(-1)
              for e in range(num_local_experts)]
    return torch.cat(blocks).view(param.shape)


def aux_loss_figures(moe: MoEConfig | None, num_layers: int, num_micro_batches: int) -> dict[str, float]:
    """The MoE aux losses of the last iteration, as Megatron logs them (``load_balancing_loss``:
    the loss before --moe-aux-loss-coeff, mean over MoE layers and micro-batches, reduced over ranks);
    resets the tracker. Every rank must call it (it all-reduces). Empty without MoE or aux loss.
    """
    if moe is None or moe.moe_aux_loss_coeff == 0:
        return {}
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    names = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}
    balancing = moe.moe_router_load_balancing_type
    tracked = [names[balancing]] if balancing in names else []
    totals: dict[str, torch.Tensor] = {}
    track_moe_metrics(loss_scale=1.0 / num_micro_batches, iteration=0, total_loss_dict=totals,
                      force_initialize=True, track_names=tracked, num_layers=num_layers,
                      moe_layer_freq=list(moe.moe_layer_pattern))
    return {name: float(value) for name, value in totals.items()}
