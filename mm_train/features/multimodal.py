"""The multimodal path: a Hugging Face vision-language model trained on FSDP2 from MindSpeed-MM's
configurations (:mod:`mm_train.engines.hf`).

Two ways in, as in MindSpeed-MM:

- ``mm-train CONFIG.yaml [flags]``: a ``pretrain_transformers`` YAML. Its ``gpt_args`` become flags
  (:func:`expand_config_file`: nested mappings flattened, ``true`` -> ``--flag``, ``false``/``null``
  dropped, a list -> one flag with every value, anything else -> ``--flag value``), its ``model`` and
  ``data`` sections are read as by ``--mm-model``/``--mm-data``; flags after the file override.
- ``mm-train --mm-model model.json --mm-data data.json [flags]``: the ``pretrain_vlm`` JSON pair
  (a YAML file there gives its ``model`` / ``data`` section).

The model section (:mod:`mm_train.model.hf.spec`) fixes the architecture, so the GPT size flags
are filled from the text decoder (sizes given on the command line that differ are listed as
without effect); the data section is :mod:`mm_train.data.mllm.spec`. The engine always shards
with FSDP2 (``--use-torch-fsdp2`` is implied; ``--fsdp2-config-path`` is optional, by default every
vision block and decoder layer is a unit) and saves ``torch_dcp`` checkpoints with a Hugging Face
directory. ``--mm-tool`` is accepted without effect.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import yaml

from mm_kernels.parallel import ULYSSES
from mm_train.data.mllm.spec import MllmDataSpec, parse_data_config
from mm_train.errors import ConfigError
from mm_train.features import flag
from mm_train.features.fsdp2 import FSDP2Config, FSDP2Settings, sharding_config, with_bf16
from mm_train.model.hf.spec import VisionLanguageModelSpec, read_model_section

YAML_SUFFIXES = (".yaml", ".yml")
# Flags whose work FSDP2 does by itself: accepted without effect on this path.
_FSDP2_DOES = ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather")
_MODEL_SIZES = (("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                ("num_attention_heads", "num_attention_heads"))


@dataclass(frozen=True)
class MultimodalConfig:
    """The vision-language model, its data, and the fused kernels asked for (``fused``: the options of
    ``mm_kernels.integrations.transformers.apply_fused_kernels``)."""

    model: VisionLanguageModelSpec
    data: MllmDataSpec
    fused: dict


@dataclass(frozen=True)
class MultimodalFiles:
    """The model and data configurations read from --mm-model / --mm-data."""

    model: VisionLanguageModelSpec
    data: MllmDataSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --mm-model, --mm-data and --mm-tool."""
    group = parser.add_argument_group("multimodal (Hugging Face vision-language models)")
    group.add_argument("--mm-model", default=None, help="MindSpeed-MM model configuration (JSON, or a YAML's model)")
    group.add_argument("--mm-data", default=None, help="MindSpeed-MM data configuration (JSON, or a YAML's data)")
    group.add_argument("--mm-tool", default=None, help="MindSpeed-MM tool configuration (accepted without effect)")


def _flatten(values: dict) -> list[tuple[str, object]]:
    items = []
    for key, value in values.items():
        items += _flatten(value) if isinstance(value, dict) else [(str(key), value)]
    return items


def _read_file(path: str) -> object:
    """The parsed YAML (.yaml / .yml) or JSON file at ``path``; ConfigError (one line) when it cannot be."""
    try:
        with open(path) as handle:
            return yaml.safe_load(handle) if path.endswith(YAML_SUFFIXES) else json.load(handle)
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or type(error).__name__})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno} column {error.colno}: {error.msg})") from None


def expand_config_file(argv: list[str]) -> list[str]:
    """``argv`` with a leading ``pretrain_transformers`` YAML file replaced by its flags (see the module
    doc); ``argv`` itself when it does not start with a .yaml / .yml file."""
    if not argv or not argv[0].endswith(YAML_SUFFIXES):
        return argv
    path = argv[0]
    raw = _read_file(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("gpt_args"), dict):
        raise ConfigError(f"{path}: a training configuration needs a 'gpt_args' mapping")
    if raw.get("lora_args"):
        raise ConfigError(f"{path}: lora_args: LoRA is not supported")
    flags: list[str] = []
    for key, value in _flatten(raw["gpt_args"]):
        name = flag(key)
        if value is True:
            flags.append(name)
        elif isinstance(value, list):
            flags += [name, *map(str, value)]
        elif value is not False and value is not None:
            flags += [name, str(value)]
    flags += ["--mm-model", path, "--mm-data", path]
    if raw.get("MM_TOOL_PATH"):
        flags += ["--mm-tool", str(raw["MM_TOOL_PATH"])]
    return flags + argv[1:]


def _section(path: str, name: str) -> object:
    """The configuration in ``path``: the whole JSON file, or section ``name`` of a YAML file."""
    raw = _read_file(path)
    if not path.endswith(YAML_SUFFIXES):
        return raw
    if not isinstance(raw, dict) or name not in raw:
        raise ConfigError(f"{path}: no '{name}' section")
    return raw[name]


def read_files(args: argparse.Namespace) -> MultimodalFiles | None:
    """The configurations of --mm-model and --mm-data (None when neither is given)."""
    if args.mm_model is None and args.mm_data is None:
        return None
    if args.mm_model is None or args.mm_data is None:
        given, missing = ("--mm-model", "--mm-data") if args.mm_data is None else ("--mm-data", "--mm-model")
        raise ConfigError(f"{given} needs {missing}")
    data = parse_data_config(_section(args.mm_data, "data"), args.mm_data)
    if not os.path.isdir(data.model_name_or_path):
        raise ConfigError(f"{args.mm_data}: model_name_or_path {data.model_name_or_path} is not a directory")
    model = read_model_section(_section(args.mm_model, "model"), args.mm_model, data.model_name_or_path)
    return MultimodalFiles(model, data)


def fill_defaults(args: argparse.Namespace, files: MultimodalFiles) -> tuple[str, ...]:
    """Fills the model flags from the text decoder and sets what this path implies (FSDP2, torch_dcp,
    per-batch padding, the loss type of ``loss_cfg``); returns the given flags without effect."""
    text = files.model.text_config
    ignored = [f"{flag(dest)} {vars(args)[dest]}" for dest, key in _MODEL_SIZES
               if vars(args)[dest] is not None and vars(args)[dest] != text[key]]
    ignored += [flag(dest) for dest in _FSDP2_DOES if vars(args)[dest]]
    if args.mm_tool:
        ignored.append("--mm-tool")
    if args.log_throughput:
        ignored.append("--log-throughput")
    if args.use_flash_attn:
        ignored.append("--use-flash-attn")   # the model's own attention implementation (sdpa) runs
    if args.tokenizer_type != "ByteTokenizer":
        ignored.append(f"--tokenizer-type {args.tokenizer_type}")
        args.tokenizer_type = "ByteTokenizer"   # the tokenizer comes from the data configuration
    ignored += [f"model.{item}" for item in files.model.unused]
    heads = text["num_attention_heads"]
    rope = text.get("rope_parameters") or {}
    args.num_layers, args.hidden_size = text["num_hidden_layers"], text["hidden_size"]
    args.num_attention_heads = heads
    args.group_query_attention = True
    args.num_query_groups = text.get("num_key_value_heads") or heads
    args.ffn_hidden_size = text["intermediate_size"]
    args.kv_channels = text.get("head_dim")
    args.max_position_embeddings = text["max_position_embeddings"]
    args.position_embedding_type = "rope"
    args.rotary_base = int(rope.get("rope_theta", args.rotary_base))
    args.normalization, args.swiglu = "RMSNorm", True
    args.norm_epsilon = text.get("rms_norm_eps", args.norm_epsilon)
    args.untie_embeddings_and_output_weights = not files.model.hf_config.get("tie_word_embeddings", False)
    args.hidden_dropout, args.attention_dropout = 0.0, float(text.get("attention_dropout") or 0.0)
    args.variable_seq_lengths = True
    args.use_distributed_optimizer = args.overlap_grad_reduce = args.overlap_param_gather = False
    args.use_torch_fsdp2 = args.use_cpu_initialization = True
    args.ckpt_format = "torch_dcp"
    mode = files.model.loss_mode
    if mode is not None and not (args.calculate_per_sample_loss or args.calculate_per_token_loss):
        args.calculate_per_sample_loss = mode == "per_sample"
        args.calculate_per_token_loss = mode == "per_token"
    return tuple(ignored)


def notices(ignored: tuple[str, ...]) -> list[str]:
    """One line naming what :func:`fill_defaults` found without effect on the multimodal path; none when
    there is nothing."""
    return [f"no effect with --mm-model (the model configuration decides): {' '.join(ignored)}"] if ignored else []


_REFUSED = (("tensor_model_parallel_size", 1, "tensor parallelism"),
            ("pipeline_model_parallel_size", 1, "pipeline parallelism"),
            ("expert_model_parallel_size", 1, "expert parallelism"),
            ("num_experts", None, "--num-experts (the model's configuration has its experts)"),
            ("recompute_granularity", None, "Megatron recompute (set recompute_granularity: full in the model's "
                                            "parts, or recompute_modules in the FSDP2 config)"),
            ("recompute_method", None, "Megatron recompute"), ("recompute_num_layers", None, "Megatron recompute"))


def check(args: argparse.Namespace, files: MultimodalFiles, world_size: int) -> None:
    """What the multimodal engine cannot run (ConfigError, one line, naming the flag)."""
    for dest, off, what in _REFUSED:
        if vars(args)[dest] != off:
            raise ConfigError(f"{flag(dest)} with --mm-model: {what} is not supported on the multimodal path")
    if args.context_parallel_size > 1 and args.context_parallel_algo != ULYSSES:
        raise ConfigError(f"--context-parallel-algo {args.context_parallel_algo} with --mm-model: only {ULYSSES} "
                          "splits the text decoder of a vision-language model")
    if args.fp16:
        raise ConfigError("--fp16 with --mm-model: there is no loss scaling on FSDP2, use --bf16")
    if args.moe_permute_fusion and "num_experts" not in files.model.text_config:
        raise ConfigError(f"--moe-permute-fusion: the {files.model.model_type} model has no experts")
    if args.seq_length < 2:
        raise ConfigError(f"--seq-length {args.seq_length} must be at least 2")
    fsdp2_settings(args, world_size)


def fsdp2_settings(args: argparse.Namespace, world_size: int) -> FSDP2Settings:
    """The FSDP2 settings: the YAML of --fsdp2-config-path when given, else the defaults; --bf16 applied."""
    if args.fsdp2_config_path:
        sharding = sharding_config(args.fsdp2_config_path, args.bf16, world_size)
    else:
        sharding = with_bf16(FSDP2Config(), args.bf16, "the default FSDP2 settings")
    return FSDP2Settings(sharding=sharding, config_path=args.fsdp2_config_path,
                         init_model_with_meta_device=args.init_model_with_meta_device)


def to_config(args: argparse.Namespace, files: MultimodalFiles) -> MultimodalConfig:
    """The :class:`MultimodalConfig` of the (checked) flags and files."""
    fused = {"rms_norm": args.use_fused_rmsnorm, "swiglu": args.use_fused_swiglu,
             "moe_permute": args.moe_permute_fusion}
    return MultimodalConfig(model=files.model, data=files.data, fused=fused)
