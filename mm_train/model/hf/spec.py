"""MindSpeed-MM's model configuration (``--mm-model model.json``, or the ``model`` section of a
``pretrain_transformers`` YAML) mapped onto a Hugging Face transformers vision-language model.

``model_id`` picks the architecture (qwen2vl, qwen2_5vl, qwen3vl, qwen3_vl_moe, with or without
underscores). The configuration of the model comes from, in this order:

- ``init_from_hf_path``: that directory's ``config.json``; the sizes in the file are then only
  checked by MindSpeed-MM, never used, and so it is here;
- otherwise the sizes of ``image_encoder.vision_encoder``, ``image_encoder.vision_projector`` and
  ``text_decoder`` (MindSpeed-MM's names, e.g. ``num_layers``, ``hidden_size``,
  ``ffn_hidden_size``, ``num_query_groups``, ``rope_theta``, ``mrope_section``,
  ``window_attn_size``) over the ``config.json`` of the data configuration's
  ``model_name_or_path`` when it is one of the same architecture, else over transformers' defaults.

Per part: ``freeze`` (vision encoder: default true, projector and text decoder: default false),
``recompute_granularity: full`` (activation checkpointing of every block / layer) and
``attn_implementation`` (eager or sdpa). ``loss_cfg`` gives ``loss_type`` and, for MoE models,
``router_aux_loss_coef``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from mm_train.errors import ConfigError, first_line

MODEL_TYPES = {
    "qwen2vl": "qwen2_vl", "qwen2_vl": "qwen2_vl",
    "qwen2_5vl": "qwen2_5_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen25vl": "qwen2_5_vl",
    "qwen3vl": "qwen3_vl", "qwen3_vl": "qwen3_vl",
    "qwen3vl_moe": "qwen3_vl_moe", "qwen3_vl_moe": "qwen3_vl_moe",
}
ARCHITECTURES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
}
ACTIVATIONS = {"quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "gelu": "gelu",
               "fast_gelu": "gelu_pytorch_tanh", "gelu_tanh": "gelu_pytorch_tanh",
               "gelu_pytorch_tanh": "gelu_pytorch_tanh"}
ATTENTION = ("eager", "sdpa")
LOSS_TYPES = {"default": "token_mean", "per_sample_loss": "per_sample", "per_token_loss": "per_token"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")

# MindSpeed-MM key -> transformers key, per part and architecture.
_TEXT = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
         "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
         "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
         "layernorm_epsilon": "rms_norm_eps", "kv_channels": "head_dim", "num_experts": "num_experts",
         "moe_ffn_hidden_size": "moe_intermediate_size", "moe_router_topk": "num_experts_per_tok"}
_PATCHES = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
            "spatial_merge_size": "spatial_merge_size", "in_channels": "in_channels",
            "num_layers": "depth", "num_attention_heads": "num_heads"}
_VISION = {
    "qwen2_vl": {**_PATCHES, "hidden_size": "embed_dim"},
    "qwen2_5_vl": {**_PATCHES, "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
                   "intermediate_size": "intermediate_size", "window_attn_size": "window_size",
                   "fullatt_block_indexes": "fullatt_block_indexes", "tokens_per_second": "tokens_per_second"},
    "qwen3_vl": {**_PATCHES, "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
                 "num_position_embeddings": "num_position_embeddings",
                 "deepstack_visual_indexes": "deepstack_visual_indexes"},
}
_VISION["qwen3_vl_moe"] = _VISION["qwen3_vl"]
_OUT_WIDTH = {"qwen2_vl": "hidden_size", "qwen2_5_vl": "out_hidden_size", "qwen3_vl": "out_hidden_size",
              "qwen3_vl_moe": "out_hidden_size"}
_TOKENS = {"img_context_token_id": "image_token_id", "image_token_id": "image_token_id",
           "vision_start_token_id": "vision_start_token_id", "vision_end_token_id": "vision_end_token_id",
           "video_token_id": "video_token_id"}


@dataclass(frozen=True)
class VisionLanguageModelSpec:
    """A vision-language model to train: the transformers architecture, its full configuration as a
    plain dict (``hf_config``, what ``config.json`` holds), where initial weights are (``weights_path``,
    None: none), and what is frozen, recomputed and which attention runs."""

    model_id: str
    model_type: str
    architecture: str
    hf_config: dict
    weights_path: str | None = None
    freeze_vision_encoder: bool = True
    freeze_vision_projector: bool = False
    freeze_text_decoder: bool = False
    recompute_vision: bool = False
    recompute_text: bool = False
    vision_attention: str = "sdpa"
    text_attention: str = "sdpa"
    loss_mode: str | None = None
    router_aux_loss_coef: float = 0.0
    unused: tuple[str, ...] = field(default=())

    def transformers_config(self):
        """The transformers configuration object of ``hf_config``."""
        import transformers

        return getattr(transformers, ARCHITECTURES[self.model_type][0]).from_dict(dict(self.hf_config))

    @property
    def text_config(self) -> dict:
        """The text decoder's part of ``hf_config``."""
        return self.hf_config["text_config"]


def has_weights(path: str | None) -> bool:
    """True when ``path`` is a directory holding Hugging Face safetensors weights."""
    return bool(path) and any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES)


def _mapping(raw: object, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    return raw


def _flag(part: dict, key: str, default: bool, where: str) -> bool:
    value = part.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _attention(part: dict, where: str, unused: list[str]) -> str:
    value = part.get("attn_implementation", "sdpa")
    if value in ATTENTION:
        return value
    unused.append(f"{where}.attn_implementation {value}")
    return "sdpa"


def _load_config(path: str, where: str):
    import transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{where} {path}: no config.json there")
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first = first_line(error)
        raise ConfigError(f"{where} {path}: config.json cannot be read ({first})") from None


def _base_config(model_type: str, processor_path: str | None):
    """The config of ``processor_path`` when it holds one of ``model_type``, else transformers' defaults."""
    import transformers

    if processor_path and os.path.isfile(os.path.join(processor_path, "config.json")):
        try:
            with open(os.path.join(processor_path, "config.json")) as handle:
                same = json.load(handle).get("model_type") == model_type
        except (OSError, ValueError):
            same = False
        if same:
            return _load_config(processor_path, "model_name_or_path")
    return getattr(transformers, ARCHITECTURES[model_type][0])()


def _set(part: dict, key: str, value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise ConfigError(f"{where} must be a number (or a list of numbers), got {value!r}")
    part[key] = value


def _with_sizes(config, model_type: str, encoder: dict, projector: dict, decoder: dict, top: dict, source: str):
    """``config`` with the MindSpeed-MM sizes of the model section written over it (a new configuration)."""
    values = config.to_dict()
    text, vision = values["text_config"], values["vision_config"]
    where = f"{source}: model.text_decoder"
    for key, target in _TEXT.items():
        if decoder.get(key) is not None:
            _set(text, target, decoder[key], f"{where}.{key}")
    if decoder.get("num_layers") is not None:
        text.pop("layer_types", None)   # derived from the layer count
    rope = dict(text.get("rope_parameters") or {"rope_type": "default"})
    for key in ("rope_theta", "mrope_section"):
        if decoder.get(key) is not None:
            rope[key] = decoder[key]
    text["rope_parameters"] = rope
    if "untie_embeddings_and_output_weights" in decoder:
        values["tie_word_embeddings"] = not _flag(decoder, "untie_embeddings_and_output_weights", False, where)
    where = f"{source}: model.image_encoder.vision_encoder"
    for key, target in _VISION[model_type].items():
        if encoder.get(key) is not None:
            _set(vision, target, encoder[key], f"{where}.{key}")
    if model_type == "qwen2_vl" and encoder.get("ffn_hidden_size") and encoder.get("hidden_size"):
        ratio, rest = divmod(encoder["ffn_hidden_size"], encoder["hidden_size"])
        if rest:
            raise ConfigError(f"{where}.ffn_hidden_size {encoder['ffn_hidden_size']} must be a multiple of its "
                              f"hidden_size {encoder['hidden_size']} (Qwen2-VL's vision MLP ratio)")
        vision["mlp_ratio"] = ratio
    if encoder.get("activation_func") is not None:
        if encoder["activation_func"] not in ACTIVATIONS:
            raise ConfigError(f"{where}.activation_func {encoder['activation_func']!r} is not supported; supported: "
                              f"{', '.join(sorted(ACTIVATIONS))}")
        vision["hidden_act"] = ACTIVATIONS[encoder["activation_func"]]
    out_width = encoder.get("llm_hidden_size") or projector.get("hidden_size") or decoder.get("hidden_size")
    if out_width is not None:
        _set(vision, _OUT_WIDTH[model_type], out_width, f"{where}.llm_hidden_size")
    for key, target in _TOKENS.items():
        if top.get(key) is not None:
            _set(values, target, top[key], f"{source}: model.{key}")
    try:
        return type(config).from_dict(values)
    except (TypeError, ValueError) as error:
        first = first_line(error)
        raise ConfigError(f"{source}: the model's sizes do not make a valid {type(config).__name__} ({first})") from None


def read_model_section(raw: object, source: str, processor_path: str | None) -> VisionLanguageModelSpec:
    """The :class:`VisionLanguageModelSpec` of a parsed model section (``source`` names it in messages;
    ``processor_path`` is the data configuration's ``model_name_or_path``). ConfigError, one line, for
    an unknown ``model_id``, a missing or foreign ``config.json`` and malformed values."""
    top = _mapping(raw, f"{source}: model")
    model_id = top.get("model_id")
    if model_id not in MODEL_TYPES:
        raise ConfigError(f"{source}: model.model_id {model_id!r} is not supported; supported: "
                          f"{', '.join(sorted(MODEL_TYPES))}")
    model_type = MODEL_TYPES[model_id]
    for part in ("text_encoder", "video_encoder", "audio_encoder"):
        if top.get(part) is not None:
            raise ConfigError(f"{source}: model.{part} is not supported (image and text models only)")
    image = _mapping(top.get("image_encoder"), f"{source}: model.image_encoder")
    encoder = _mapping(image.get("vision_encoder"), f"{source}: model.image_encoder.vision_encoder")
    projector = _mapping(image.get("vision_projector"), f"{source}: model.image_encoder.vision_projector")
    decoder = _mapping(top.get("text_decoder"), f"{source}: model.text_decoder")
    hf_path = top.get("init_from_hf_path")
    if hf_path is not None and not isinstance(hf_path, str):
        raise ConfigError(f"{source}: model.init_from_hf_path must be a directory path, got {hf_path!r}")
    if hf_path:
        config = _load_config(hf_path, f"{source}: model.init_from_hf_path")
        weights = hf_path if has_weights(hf_path) else None
    else:
        config = _with_sizes(_base_config(model_type, processor_path), model_type, encoder, projector, decoder, top,
                             source)
        weights = processor_path if has_weights(processor_path) else None
    if config.model_type != model_type:
        raise ConfigError(f"{source}: model.model_id {model_id} is {model_type}, but {hf_path}/config.json holds "
                          f"a {config.model_type} model")
    loss = _mapping(top.get("loss_cfg"), f"{source}: model.loss_cfg")
    loss_type = loss.get("loss_type", "default")
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"{source}: model.loss_cfg.loss_type {loss_type!r} is not supported; supported: "
                          f"{', '.join(LOSS_TYPES)}")
    coefficient = loss.get("router_aux_loss_coef", getattr(config.text_config, "router_aux_loss_coef", 0.0) or 0.0)
    unused: list[str] = []
    where = f"{source}: model"
    return VisionLanguageModelSpec(
        model_id=model_id, model_type=model_type, architecture=ARCHITECTURES[model_type][1],
        hf_config=config.to_dict(), weights_path=weights,
        freeze_vision_encoder=_flag(encoder, "freeze", True, f"{where}.image_encoder.vision_encoder"),
        freeze_vision_projector=_flag(projector, "freeze", False, f"{where}.image_encoder.vision_projector"),
        freeze_text_decoder=_flag(decoder, "freeze", False, f"{where}.text_decoder"),
        recompute_vision=encoder.get("recompute_granularity") == "full",
        recompute_text=decoder.get("recompute_granularity") == "full",
        vision_attention=_attention(encoder, "image_encoder.vision_encoder", unused),
        text_attention=_attention(decoder, "text_decoder", unused),
        loss_mode=None if loss_type == "default" else LOSS_TYPES[loss_type],
        router_aux_loss_coef=float(coefficient), unused=tuple(unused))
