"""Building a Hugging Face vision-language model for training: its weights (a Hugging Face directory,
or random), the parts to freeze, mm_kernels' fused kernels, the attention implementations, and FSDP2
sharding, optionally on the meta device.

Random values are drawn per parameter from a generator keyed by (seed, parameter name), as
transformers initialises (normal(0, initializer_range) weights, ones for norm weights, zeros for
biases), so every layout and the meta-device build start from the same model. Parts, by parameter
name: the vision encoder is ``model.visual`` without its mergers, the projector is
``model.visual.merger`` (and Qwen3-VL's ``deepstack_merger_list``), the text decoder is
``model.language_model`` and ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from mm_kernels.integrations.transformers import FusedKernelReport, apply_fused_kernels
from mm_train.errors import CheckpointError, first_line
from mm_train.features.fsdp2 import (
    FSDP2Config,
    apply_fsdp2,
    apply_recompute,
    needs_fsdp2_on_one_rank,
    select_modules,
)
from mm_train.model.hf.spec import VisionLanguageModelSpec
from mm_train.model.init import FullValue, init_parameters_, keyed_normal, materialize_meta_model

PROJECTOR = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
VISION = ("model.visual.",)
TEXT = ("model.language_model.", "lm_head.")
# Legacy (transformers 4.x) checkpoint names of the same tensors.
_LEGACY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def part_of(name: str) -> str:
    """'vision_projector', 'vision_encoder' or 'text_decoder': the part parameter ``name`` belongs to."""
    if name.startswith(PROJECTOR):
        return "vision_projector"
    if name.startswith(VISION):
        return "vision_encoder"
    return "text_decoder"


def freeze_parts(model: nn.Module, spec: VisionLanguageModelSpec) -> list[str]:
    """Turns off gradients of the parts ``spec`` freezes; returns the frozen parts' names."""
    frozen = {part for part, off in (("vision_encoder", spec.freeze_vision_encoder),
                                     ("vision_projector", spec.freeze_vision_projector),
                                     ("text_decoder", spec.freeze_text_decoder)) if off}
    for name, param in model.named_parameters():
        if part_of(name) in frozen:
            param.requires_grad_(False)
    return sorted(frozen)


def random_values(model: nn.Module, std: float, seed: int) -> FullValue:
    """``full_value(name, shape)`` of a freshly initialised ``model`` (see the module doc)."""
    rules: dict[str, str] = {}
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        norm = "RMSNorm" in kind or "LayerNorm" in kind
        for short, _ in module.named_parameters(recurse=False):
            name = f"{prefix}.{short}" if prefix else short
            rules[name] = "zeros" if short == "bias" else "ones" if norm else "normal"

    def value(name: str, shape: torch.Size) -> torch.Tensor:
        rule = rules[name]
        if rule == "normal":
            return keyed_normal(list(shape), std, seed, name)
        return torch.ones(shape) if rule == "ones" else torch.zeros(shape)

    return value


def _weight_files(path: str) -> dict[str, str]:
    """{tensor name: safetensors file} of the Hugging Face directory ``path``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            return {name: os.path.join(path, file) for name, file in json.load(handle)["weight_map"].items()}
    from safetensors import safe_open

    single = os.path.join(path, "model.safetensors")
    with safe_open(single, "pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def checkpoint_values(path: str) -> FullValue:
    """``full_value(name, shape)`` read tensor by tensor from the safetensors of ``path`` (legacy 4.x names
    accepted); CheckpointError for a tensor that is missing or of another shape."""
    from safetensors import safe_open

    files = _weight_files(path)

    def value(name: str, shape: torch.Size) -> torch.Tensor:
        candidates = [name] + [old + name[len(new):] for new, old in _LEGACY_PREFIXES if name.startswith(new)]
        key = next((candidate for candidate in candidates if candidate in files), None)
        if key is None:
            raise CheckpointError(f"{path}: no tensor {name} for the model")
        with safe_open(files[key], "pt") as handle:
            tensor = handle.get_tensor(key)
        if tensor.shape != shape:
            raise CheckpointError(f"{path}: {key} has shape {list(tensor.shape)}, the model needs {list(shape)}; "
                                  "the model configuration does not match these weights")
        return tensor

    return value


def init_buffers(model: nn.Module) -> None:
    """Recomputes the buffers (rotary frequencies) of a model allocated with ``to_empty``."""
    for module in model.modules():
        if next(module.buffers(recurse=False), None) is not None:
            model._init_weights(module)


def default_units(model: nn.Module, tied: bool) -> tuple[str, ...]:
    """FSDP2 units when the YAML lists none: each vision block, the mergers, the vision tower, each
    decoder layer and (untied) the output layer; the rest stays in the root unit."""
    names = {name for name, _ in model.named_modules()}
    units = ["model.visual.blocks.*", "model.visual.merger"]
    if "model.visual.deepstack_merger_list" in names:
        units.append("model.visual.deepstack_merger_list.*")
    units += ["model.visual", "model.language_model.layers.*"]
    if not tied:
        units.append("lm_head")
    return tuple(units)


def sharding_for(model: nn.Module, spec: VisionLanguageModelSpec, sharding: FSDP2Config) -> FSDP2Config:
    """``sharding`` with the default units when it names none, and the parts ``spec`` recomputes added."""
    units = sharding.sub_modules_to_wrap or default_units(model, bool(spec.hf_config.get("tie_word_embeddings")))
    recompute = list(sharding.recompute_modules)
    if spec.recompute_vision:
        recompute.append("model.visual.blocks.*")
    if spec.recompute_text:
        recompute.append("model.language_model.layers.*")
    return dataclasses.replace(sharding, sub_modules_to_wrap=tuple(units), recompute_modules=tuple(dict.fromkeys(recompute)))


def _pretrained(cls, spec: VisionLanguageModelSpec, config) -> nn.Module:
    """``cls`` with the weights of ``spec.weights_path``; CheckpointError when they do not fit."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(spec.weights_path, config=config, dtype=torch.float32,
                                          local_files_only=True, output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as error:
        first = first_line(error)
        raise CheckpointError(f"{spec.weights_path}: weights do not fit the model ({first})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = info.get("missing_keys") or []
    if missing:
        raise CheckpointError(f"{spec.weights_path}: {len(missing)} tensor(s) of the model missing, e.g. "
                              f"{sorted(missing)[0]}")
    return model


def build_model(spec: VisionLanguageModelSpec, sharding: FSDP2Config, device: torch.device, *, meta: bool,
                seed: int, text_attention: str, fused: dict[str, bool],
                mesh=None) -> tuple[nn.Module, FusedKernelReport | None]:
    """The FSDP2-sharded fp32 model of ``spec`` on ``device`` and the report of the fused kernels
    (None when none is asked for). On one rank without FSDP2 mixed precision or offload the model is
    left unsharded (FSDP2 would only copy it back and forth); recomputation applies either way.

    Weights: ``spec.weights_path`` when set, else random (see the module doc). ``meta``: build on the
    meta device, shard, then allocate and fill only this rank's shards. ``text_attention``: the text
    decoder's attention implementation (a name registered with transformers); ``fused``:
    ``apply_fused_kernels`` options (rms_norm, swiglu, moe_permute).
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = spec.transformers_config()
    cls = getattr(transformers, spec.architecture)
    std = getattr(config.text_config, "initializer_range", 0.02) or 0.02
    if meta:
        with torch.device("meta"):
            model = cls._from_config(config, dtype=torch.float32)
    elif spec.weights_path:
        model = _pretrained(cls, spec, config)
    else:
        model = cls._from_config(config, dtype=torch.float32)
        init_parameters_(model, random_values(model, std, seed))
    model.set_attn_implementation({"text_config": text_attention, "vision_config": spec.vision_attention})
    model.config.use_cache = False
    model.train()
    freeze_parts(model, spec)
    report = apply_fused_kernels(model, **fused) if any(fused.values()) else None
    full_value = None
    if meta:
        full_value = checkpoint_values(spec.weights_path) if spec.weights_path else random_values(model, std, seed)
    sharding = sharding_for(model, spec, sharding)
    if dist.get_world_size() > 1 or needs_fsdp2_on_one_rank(sharding):
        apply_fsdp2(model, sharding, mesh)
    else:   # one rank and no mixed precision: FSDP2 would shard nothing and only copy
        select_modules(model, sharding.sub_modules_to_wrap, "sub_modules_to_wrap")
        apply_recompute(model, sharding)
    if meta:
        materialize_meta_model(model, device, full_value, init_buffers)
    else:
        model.to(device)
    return model, report
