"""A trained model as a Hugging Face directory: ``config.json``, safetensors weights, the tokenizer and
the image processor, loadable with ``AutoModelForImageTextToText.from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mm_train.checkpoint.atomic import rank
from mm_train.model.hf.spec import VisionLanguageModelSpec


def write_hf_directory(model: nn.Module, spec: VisionLanguageModelSpec, tokenizer, image_processor,
                       directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Writes ``model`` (FSDP2-sharded or not; collective over all ranks) to ``directory`` on rank 0:
    the full weights in ``dtype`` (tied weights once), the configuration of ``spec`` (default attention),
    the tokenizer and the image processor."""
    from huggingface_hub import save_torch_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() != 0:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seen: dict[int, str] = {}
    weights = {}
    for name, tensor in state.items():
        if id(tensor) in seen:
            continue
        seen[id(tensor)] = name
        weights[name] = tensor.to(dtype)
    save_torch_state_dict(weights, directory, metadata={"format": "pt"})
    config = spec.transformers_config()
    config.architectures = [spec.architecture]
    config.dtype = dtype
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
