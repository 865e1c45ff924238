"""Randomly initialised Hugging Face models of the supported types, and training batches for them.

Two sizes: ``tiny`` (hidden 64, 2 layers: tests) and ``small`` (hidden 512, 4 layers: ``mm-bench hf``).
Vision-language models get one random image per sample, its placeholder tokens in the text
(``<vision_start>`` + image pads + ``<vision_end>``, or Gemma 3's image tokens) and the grid their
vision tower expects. Nothing is downloaded. transformers is imported only when a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

VOCAB = 512
# Special tokens of the vision-language configs, inside the small vocabulary.
IMAGE, VISION_START, VISION_END, VIDEO = VOCAB - 4, VOCAB - 3, VOCAB - 2, VOCAB - 1


@dataclass(frozen=True)
class Size:
    """Text tower dimensions (the vision tower is derived from them)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    experts: int
    image_side: int  # patches per side of each image (before the 2x2 merge)


SIZES = {
    "tiny": Size(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, experts=4, image_side=4),
    "small": Size(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1408, experts=8, image_side=8),
}

TEXT_MODELS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma": "GemmaForCausalLM",
}
VISION_MODELS = {
    "gemma3": "Gemma3ForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}
MODEL_TYPES = tuple(TEXT_MODELS) + tuple(VISION_MODELS)


def _text_config(size: Size) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=size.hidden, num_hidden_layers=size.layers,
                num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                head_dim=size.hidden // size.heads, intermediate_size=size.intermediate,
                max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)


def _moe_config(size: Size, experts_key: str) -> dict:
    return {experts_key: size.experts, "num_experts_per_tok": 2, "moe_intermediate_size": size.intermediate // 4}


def _vision_tokens(size: Size) -> dict:
    return dict(image_token_id=IMAGE, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                video_token_id=VIDEO)


def _config(model_type: str, size: Size):
    import transformers

    text = _text_config(size)
    vision_hidden = size.hidden // 2
    if model_type == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**text, **_moe_config(size, "num_experts"))
    if model_type == "mixtral":
        return transformers.MixtralConfig(**text, num_local_experts=size.experts, num_experts_per_tok=2)
    if model_type == "gemma":
        return transformers.GemmaConfig(**text, hidden_act="gelu_pytorch_tanh")
    if model_type in TEXT_MODELS:
        config_class = getattr(transformers, TEXT_MODELS[model_type].replace("ForCausalLM", "Config"))
        return config_class(**text)
    if model_type == "gemma3":
        vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
                      num_attention_heads=2, image_size=8 * size.image_side, patch_size=4)
        return transformers.Gemma3Config(text_config={**text, "sliding_window": 64}, vision_config=vision,
                                         mm_tokens_per_image=(size.image_side // 2) ** 2, image_token_index=IMAGE,
                                         boi_token_index=VISION_START, eoi_token_index=VISION_END)
    patch = dict(patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, depth=2, num_heads=2)
    if model_type == "qwen2_vl":
        vision = {**patch, "embed_dim": vision_hidden, "mlp_ratio": 2, "hidden_size": size.hidden}
        return transformers.Qwen2VLConfig(text_config={**text, "rope_scaling": _mrope(size)}, vision_config=vision,
                                          **_vision_tokens(size))
    if model_type == "qwen2_5_vl":
        vision = {**patch, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
                  "out_hidden_size": size.hidden, "window_size": 4, "fullatt_block_indexes": [1]}
        return transformers.Qwen2_5_VLConfig(text_config={**text, "rope_scaling": _mrope(size)}, vision_config=vision,
                                             **_vision_tokens(size))
    vision = {**patch, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
              "out_hidden_size": size.hidden, "num_position_embeddings": 16 * size.image_side ** 2,
              "deepstack_visual_indexes": [0]}
    rope = {"rope_type": "default", "mrope_section": _mrope(size)["mrope_section"], "mrope_interleaved": True}
    if model_type == "qwen3_vl":
        return transformers.Qwen3VLConfig(text_config={**text, "rope_scaling": rope}, vision_config=vision,
                                          **_vision_tokens(size))
    if model_type == "qwen3_vl_moe":
        text_moe = {**text, **_moe_config(size, "num_experts"), "rope_scaling": rope}
        return transformers.Qwen3VLMoeConfig(text_config=text_moe, vision_config=vision, **_vision_tokens(size))
    raise ValueError(f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")


def mrope_section(size: Size) -> list[int]:
    """Multimodal rotary sections (temporal, height, width) that add up to half the head dim."""
    half = size.hidden // size.heads // 2
    height = width = 3 * half // 8
    return [half - height - width, height, width]


def _mrope(size: Size) -> dict:
    return {"type": "mrope", "mrope_section": mrope_section(size)}


def build_model(model_type: str, size: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A freshly initialised model of ``model_type`` (one of :data:`MODEL_TYPES`) in ``dtype``, eager attention."""
    import transformers

    config = _config(model_type, SIZES[size])
    model_class = getattr(transformers, {**TEXT_MODELS, **VISION_MODELS}[model_type])
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="eager", dtype=dtype)
    return model.train()


def make_batch(model_type: str, batch: int, seq: int, size: str = "tiny", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> dict[str, Tensor]:
    """Keyword inputs (labels included) for one training step of ``batch`` sequences of ``seq`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB - 4, (batch, seq), generator=generator)
    inputs = {"input_ids": input_ids}
    if model_type in VISION_MODELS:
        inputs.update(_image_inputs(model_type, input_ids, SIZES[size], dtype, generator))
    inputs["labels"] = input_ids.clone()
    return inputs


def _image_inputs(model_type: str, input_ids: Tensor, size: Size, dtype: torch.dtype,
                  generator: torch.Generator) -> dict[str, Tensor]:
    """One image per sample: its placeholder tokens written into input_ids (in place), pixels and grid."""
    batch = input_ids.shape[0]
    side = size.image_side
    image_tokens = (side // 2) ** 2
    placeholder = [VISION_START] + [IMAGE] * image_tokens + [VISION_END]
    input_ids[:, 1:1 + len(placeholder)] = torch.tensor(placeholder)
    if model_type == "gemma3":
        pixels = torch.randn(batch, 3, 8 * side, 8 * side, generator=generator).to(dtype)
        token_type_ids = (input_ids == IMAGE).long()
        return {"pixel_values": pixels, "token_type_ids": token_type_ids}
    patches = batch * side * side
    pixels = torch.randn(patches, 3 * 2 * 2 * 2, generator=generator).to(dtype)
    grid = torch.tensor([[1, side, side]] * batch)
    return {"pixel_values": pixels, "image_grid_thw": grid, "mm_token_type_ids": (input_ids == IMAGE).long()}
