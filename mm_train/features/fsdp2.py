"""FSDP2 (torch.distributed.fsdp.fully_shard) for ``--use-torch-fsdp2 --fsdp2-config-path cfg.yaml``:
the flags and their checks, the YAML settings (:class:`FSDP2Config`), the sharding of a model per
those settings (:func:`apply_fsdp2`), and the meta-device build (``--init-model-with-meta-device``).
:mod:`mm_train.engines.fsdp2` trains with it.

The YAML file holds the keys of :class:`FSDP2Config`. ``sub_modules_to_wrap`` and
``recompute_modules`` are lists of patterns; a pattern selects a module (never the root) when it
matches any of:

- the module's qualified name, part by part: ``decoder.layers.*`` matches ``decoder.layers.3``
  but not ``decoder.layers.3.mlp`` (``*``/``?``/``[..]`` are shell wildcards within one part;
  MindSpeed-MM's ``{*}`` is accepted as ``*``);
- the module's class name, e.g. ``TransformerLayer`` (wildcards allowed);
- the module's class path, e.g. ``megatron.core.transformer.transformer_layer.TransformerLayer``.

A pattern that selects nothing is an error, so typos do not silently leave a model unsharded.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from mm_train.errors import ConfigError
from mm_train.features import flag
from mm_train.launch import device_type
from mm_train.model.init import FullValue, materialize_meta_model

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


class FSDP2ConfigError(ValueError):
    """A bad FSDP2 YAML config: the message names the file and the key."""


@dataclass(frozen=True)
class FSDP2Config:
    """The FSDP2 settings of one run (the YAML keys, with their defaults).

    sharding_size: ranks per shard group, or "auto" (= world size); fewer than the world
        size gives HSDP (replicas of shard groups).
    sub_modules_to_wrap: patterns of modules that become their own FSDP unit (see module doc);
        the root module is always one.
    reshard_after_forward: free unsharded parameters after forward (True), keep them (False),
        or reshard to groups of this many ranks (int).
    param_dtype / reduce_dtype: compute and gradient-reduction dtypes ("bf16", "fp16", "fp32"
        or None = the parameter's own dtype).
    cast_forward_inputs: cast floating inputs of each FSDP unit to param_dtype.
    offload_to_cpu: keep sharded parameters, gradients and optimizer state on the CPU.
    pin_memory: pin the offloaded memory (only when an accelerator exists).
    num_to_forward_prefetch / num_to_backward_prefetch: how many following (forward) or
        preceding (backward) FSDP units to all-gather ahead of use.
    recompute_modules: patterns of modules whose activations are recomputed in backward.
    output_dtype: the dtype each FSDP unit's floating outputs are cast to (None: left as computed).
    ignored_modules: patterns of modules FSDP2 leaves whole and unsynchronised on every rank
        (frozen parts only: their gradients would not be reduced).
    MindSpeed-MM's keys use_reentrant, align_fsdp_param_groups, reshard_local_experts and
    moe_modules are accepted and change nothing here (recomputation is non-reentrant; experts are
    sharded like other parameters); expert_parallel_size must be 1.
    """

    sharding_size: int | str = "auto"
    sub_modules_to_wrap: tuple[str, ...] = ()
    reshard_after_forward: bool | int = True
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    cast_forward_inputs: bool = True
    offload_to_cpu: bool = False
    pin_memory: bool = True
    num_to_forward_prefetch: int = 0
    num_to_backward_prefetch: int = 0
    recompute_modules: tuple[str, ...] = ()
    output_dtype: torch.dtype | None = None
    ignored_modules: tuple[str, ...] = ()


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise FSDP2ConfigError(f"key '{key}' must be true or false, got {value!r}")
    return value


def _count(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FSDP2ConfigError(f"key '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _sharding_size(key: str, value: object) -> int | str:
    return "auto" if value == "auto" else _count(key, value, 1)


def _reshard(key: str, value: object) -> bool | int:
    return value if isinstance(value, bool) else _count(key, value, 1)


def _dtype(key: str, value: object) -> torch.dtype | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise FSDP2ConfigError(f"key '{key}' must be one of {sorted(DTYPES)} or null, got {value!r}")
    return DTYPES[value]


def _expert_parallel(key: str, value: object) -> None:
    if _count(key, value, 1) != 1:
        raise FSDP2ConfigError(f"key '{key}': expert parallelism under FSDP2 is not supported, got {value}")


def _patterns(key: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise FSDP2ConfigError(f"key '{key}' must be a list of non-empty module patterns, got {value!r}")
    return tuple(value)


_PARSERS = {
    "sharding_size": _sharding_size,
    "sub_modules_to_wrap": _patterns,
    "reshard_after_forward": _reshard,
    "param_dtype": _dtype,
    "reduce_dtype": _dtype,
    "cast_forward_inputs": _bool,
    "offload_to_cpu": _bool,
    "pin_memory": _bool,
    "num_to_forward_prefetch": lambda key, value: _count(key, value, 0),
    "num_to_backward_prefetch": lambda key, value: _count(key, value, 0),
    "recompute_modules": _patterns,
    "output_dtype": _dtype,
    "ignored_modules": _patterns,
}
# MindSpeed-MM keys without an effect here: their values are checked, then dropped.
_ACCEPTED = {
    "use_reentrant": _bool,
    "align_fsdp_param_groups": _bool,
    "reshard_local_experts": _bool,
    "moe_modules": _patterns,
    "expert_parallel_size": _expert_parallel,
}


def parse_fsdp2_config(raw: object) -> FSDP2Config:
    """Builds an :class:`FSDP2Config` from a parsed YAML mapping (None = all defaults)."""
    if raw is None:
        return FSDP2Config()
    if not isinstance(raw, dict):
        raise FSDP2ConfigError(f"must be a mapping of FSDP2 keys, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _PARSERS and k not in _ACCEPTED)
    if unknown:
        raise FSDP2ConfigError(f"unknown key(s) {unknown}; known keys: {sorted(_PARSERS | _ACCEPTED)}")
    for key in _ACCEPTED.keys() & raw.keys():
        _ACCEPTED[key](key, raw[key])
    return FSDP2Config(**{key: _PARSERS[key](key, value) for key, value in raw.items() if key in _PARSERS})


def load_fsdp2_config(path: str | Path) -> FSDP2Config:
    """Reads the FSDP2 YAML file at ``path``; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--fsdp2-config-path {path}: no such file")
    import yaml  # only FSDP2 runs read YAML

    try:
        return parse_fsdp2_config(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as error:
        raise FSDP2ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    except FSDP2ConfigError as error:
        raise FSDP2ConfigError(f"{path}: {error}") from None


def _name_matches(pattern: str, name: str) -> bool:
    parts, name_parts = pattern.split("."), name.split(".")
    return len(parts) == len(name_parts) and all(map(fnmatch.fnmatchcase, name_parts, parts))


def module_matches(pattern: str, name: str, module: nn.Module) -> bool:
    """True when ``pattern`` selects the module called ``name`` (rules in the module docstring)."""
    pattern = pattern.replace("{*}", "*")
    cls = type(module)
    return (_name_matches(pattern, name)
            or fnmatch.fnmatchcase(cls.__name__, pattern)
            or pattern == f"{cls.__module__}.{cls.__qualname__}")


def select_modules(model: nn.Module, patterns: Sequence[str], key: str) -> list[nn.Module]:
    """Sub-modules of ``model`` selected by ``patterns``, in forward (definition) order.

    Raises FSDP2ConfigError naming ``key`` when a pattern selects nothing.
    """
    selected, unused = [], set(patterns)
    for name, module in model.named_modules():
        hits = {p for p in patterns if name and module_matches(p, name, module)}
        if hits:
            selected.append(module)
            unused -= hits
    if unused:
        raise FSDP2ConfigError(f"key '{key}': pattern(s) {sorted(unused)} match no sub-module of "
                               f"{type(model).__name__}")
    return selected


def fsdp2_device_mesh(config: FSDP2Config, world_size: int) -> DeviceMesh:
    """The mesh FSDP2 shards over: 1-D ("dp_shard") or, when sharding_size < world size,
    2-D ("dp_replicate", "dp_shard") for HSDP. Needs an initialised process group."""
    shard = world_size if config.sharding_size == "auto" else config.sharding_size
    if world_size % shard:
        raise FSDP2ConfigError(f"key 'sharding_size': {shard} does not divide the world size {world_size}")
    kind = device_type()
    if shard == world_size:
        return init_device_mesh(kind, (world_size,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(kind, (world_size // shard, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """The device this rank's part of ``mesh`` lives on (the current accelerator, or the CPU)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def _set_prefetch(units: list[nn.Module], forward: int, backward: int) -> None:
    for i, unit in enumerate(units):
        if forward:
            unit.set_modules_to_forward_prefetch(units[i + 1:i + 1 + forward])
        if backward:
            unit.set_modules_to_backward_prefetch(units[max(0, i - backward):i][::-1])


def apply_recompute(model: nn.Module, config: FSDP2Config) -> None:
    """Activation checkpointing (recomputation in backward) on the ``recompute_modules`` of ``model``."""
    for module in select_modules(model, config.recompute_modules, "recompute_modules"):
        checkpoint(module)


def needs_fsdp2_on_one_rank(config: FSDP2Config) -> bool:
    """Whether ``config`` asks FSDP2 for something besides sharding: mixed precision or CPU offload."""
    return (config.offload_to_cpu or config.param_dtype is not None or config.reduce_dtype is not None
            or config.output_dtype is not None)


def apply_fsdp2(model: nn.Module, config: FSDP2Config, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shards ``model`` in place with ``fully_shard`` per ``config`` and returns it.

    Order: activation checkpointing on ``recompute_modules``; ``fully_shard`` on each
    ``sub_modules_to_wrap`` module (innermost first) and then on the root; forward/backward
    prefetch lists over the wrapped sub-modules in forward order. ``mesh`` defaults to
    :func:`fsdp2_device_mesh` over the whole default process group. Works on a model built on
    the meta device (then call ``to_empty`` and initialise; see :func:`build_fsdp2_model_on_meta`).
    Parameter names are unchanged, so names-keyed init and checkpoints see the global names.
    Parameters of ``ignored_modules`` are left whole (moved to the mesh's device unless on meta); over
    more than one rank they must be frozen (ConfigError), as nothing would reduce their gradients.
    """
    if mesh is None:
        mesh = fsdp2_device_mesh(config, dist.get_world_size())
    ignored = {param for module in select_modules(model, config.ignored_modules, "ignored_modules")
               for param in module.parameters()}
    if mesh.size() > 1 and any(param.requires_grad for param in ignored):
        raise ConfigError(f"FSDP2 key 'ignored_modules' {list(config.ignored_modules)} holds trainable parameters "
                          f"whose gradients nothing would reduce over {mesh.size()} ranks: freeze them or list "
                          "fewer modules")
    device = mesh_device(mesh)
    for param in ignored:
        if not param.is_meta:
            param.data = param.data.to(device)
    wrapped = select_modules(model, config.sub_modules_to_wrap, "sub_modules_to_wrap")
    apply_recompute(model, config)
    offload = OffloadPolicy()
    if config.offload_to_cpu:
        offload = CPUOffloadPolicy(pin_memory=config.pin_memory and device.type != "cpu")
    shard_args = dict(
        mesh=mesh,
        reshard_after_forward=config.reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype,
                                       output_dtype=config.output_dtype,
                                       cast_forward_inputs=config.cast_forward_inputs),
        offload_policy=offload,
        ignored_params=ignored or None,
    )
    for module in reversed(wrapped):
        fully_shard(module, **shard_args)
    fully_shard(model, **shard_args)
    _set_prefetch(wrapped, config.num_to_forward_prefetch, config.num_to_backward_prefetch)
    return model


def build_fsdp2_model_on_meta(build_model: Callable[[], nn.Module], config: FSDP2Config, full_value: FullValue,
                              device: torch.device | str, mesh: DeviceMesh | None = None,
                              init_buffers: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Builds ``build_model()`` on the meta device (no memory), shards it with :func:`apply_fsdp2`, then
    allocates only this rank's shards on ``device`` and sets them from the layout-independent full
    values (:func:`mm_train.model.init.materialize_meta_model`). No rank ever holds the full model."""
    with torch.device("meta"):
        model = build_model()
    apply_fsdp2(model, config, mesh)
    return materialize_meta_model(model, device, full_value, init_buffers)


# ---- the command line ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FSDP2Settings:
    """``--use-torch-fsdp2``: the YAML's sharding settings (with --bf16 applied), the file they came
    from (None: the defaults), and whether the model is built on the meta device."""

    sharding: FSDP2Config
    config_path: str | None
    init_model_with_meta_device: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --use-torch-fsdp2, --fsdp2-config-path, --use-cpu-initialization, --init-model-with-meta-device."""
    group = parser.add_argument_group("FSDP2")
    group.add_argument("--use-torch-fsdp2", action="store_true",
                       help="shard parameters, gradients and optimizer state with torch FSDP2 over all ranks")
    group.add_argument("--fsdp2-config-path", default=None, help="FSDP2 settings (YAML)")
    group.add_argument("--use-cpu-initialization", action="store_true",
                       help="build and initialise the model in host memory (required by --use-torch-fsdp2)")
    group.add_argument("--init-model-with-meta-device", action="store_true",
                       help="build on the meta device, shard, then allocate and initialise only the shards")


_PARALLEL_SIZES = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                   "expert_model_parallel_size")
_MEGATRON_DDP_FLAGS = ("use_distributed_optimizer", "sequence_parallel", "overlap_grad_reduce", "overlap_param_gather")
_RECOMPUTE_FLAGS = ("recompute_granularity", "recompute_method", "recompute_num_layers")


def check(args: argparse.Namespace, world_size: int) -> None:
    """Refuses the flag combinations FSDP2 cannot run (ConfigError, one line, naming the flag) and reads
    the YAML so that its errors are reported before start-up.

    Without ``--use-torch-fsdp2`` only the flags that need it are refused. With it:
    ``--fsdp2-config-path`` and ``--use-cpu-initialization`` are required; TP/PP/CP/EP sizes must be 1;
    Megatron's DDP and distributed optimizer, sequence parallel and Megatron recompute must be off (the
    YAML's recompute_modules replaces the latter); checkpoints (``--save``/``--load``) use
    ``--ckpt-format torch_dcp``; ``--fp16`` is refused (no loss scaling here).
    """
    flags = vars(args)
    if not args.use_torch_fsdp2:
        for dest in ("fsdp2_config_path", "init_model_with_meta_device"):
            if flags[dest]:
                raise ConfigError(f"{flag(dest)} requires --use-torch-fsdp2")
        return
    if not args.fsdp2_config_path:
        raise ConfigError("--use-torch-fsdp2 requires --fsdp2-config-path")
    if not args.use_cpu_initialization:
        raise ConfigError("--use-torch-fsdp2 requires --use-cpu-initialization")
    for dest in _PARALLEL_SIZES:
        if flags[dest] > 1:
            raise ConfigError(f"--use-torch-fsdp2 needs {flag(dest)} 1, got {flags[dest]}: FSDP2 shards over "
                              "data-parallel ranks only")
    for dest in _MEGATRON_DDP_FLAGS:
        if flags[dest]:
            raise ConfigError(f"--use-torch-fsdp2 cannot be combined with {flag(dest)}: FSDP2 replaces Megatron's "
                              "DDP and optimizer sharding")
    for dest in _RECOMPUTE_FLAGS:
        if flags[dest] is not None:
            raise ConfigError(f"--use-torch-fsdp2 cannot be combined with {flag(dest)}: list the modules under "
                              "recompute_modules in the FSDP2 config")
    if (args.save or args.load) and args.ckpt_format != "torch_dcp":
        raise ConfigError(f"--use-torch-fsdp2 saves and loads with --ckpt-format torch_dcp only, got {args.ckpt_format}")
    if args.fp16:
        raise ConfigError("--use-torch-fsdp2 cannot be combined with --fp16 (no loss scaling): use --bf16")
    sharding_config(args.fsdp2_config_path, args.bf16, world_size)


def sharding_config(path: str, bf16: bool, world_size: int) -> FSDP2Config:
    """The YAML at ``path`` with --bf16 applied: param_dtype bf16 (and reduce_dtype fp32 unless set) when
    the YAML leaves param_dtype null; a YAML dtype other than bf16 conflicts. ConfigError (one line)
    for a missing or bad file, a sharding size that does not divide ``world_size``, and fp16 compute or
    gradient reduction (it needs loss scaling, which the FSDP2 engine does not have)."""
    try:
        config = load_fsdp2_config(path)
    except (FSDP2ConfigError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    shard = config.sharding_size
    if shard != "auto" and world_size % shard:
        raise ConfigError(f"{path}: key 'sharding_size': {shard} does not divide the world size {world_size}")
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(config, key) == torch.float16:
            raise ConfigError(f"{path}: key '{key}': fp16 needs loss scaling, which the FSDP2 engine does not "
                              "have: use bf16")
    return with_bf16(config, bf16, path)


def with_bf16(config: FSDP2Config, bf16: bool, source: str) -> FSDP2Config:
    """``config`` with --bf16 applied: param_dtype bf16 (and reduce_dtype fp32 unless set) when it leaves
    param_dtype null; another param_dtype conflicts (ConfigError naming ``source``)."""
    if bf16 and config.param_dtype not in (None, torch.bfloat16):
        raise ConfigError(f"--bf16 conflicts with param_dtype {config.param_dtype} in {source}")
    if bf16 and config.param_dtype is None:
        return dataclasses.replace(config, param_dtype=torch.bfloat16, reduce_dtype=config.reduce_dtype or torch.float32)
    return config


def to_config(args: argparse.Namespace, world_size: int) -> FSDP2Settings | None:
    """The :class:`FSDP2Settings` of the (checked) flags; None without --use-torch-fsdp2."""
    if not args.use_torch_fsdp2:
        return None
    return FSDP2Settings(sharding=sharding_config(args.fsdp2_config_path, args.bf16, world_size),
                         config_path=args.fsdp2_config_path,
                         init_model_with_meta_device=args.init_model_with_meta_device)
