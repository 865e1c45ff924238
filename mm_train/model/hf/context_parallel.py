"""The text decoder of a Hugging Face vision-language model on a sequence split over context-parallel
ranks (Ulysses, ``--context-parallel-algo ulysses_cp_algo``), and the vision pass every rank runs.

transformers' Qwen-VL models compute the token embeddings, run the vision tower, merge its features
into the embeddings and compute the multimodal rotary (mrope) positions for the whole sequence, then
call their text model. A forward pre-hook on that text model (:class:`TextModelEntry`) cuts the
embeddings, the position ids and (Qwen3-VL) the deepstack visual positions and features to this
rank's contiguous piece; the decoder layers then run on S / C tokens and their attention, the
implementation :class:`UlyssesAttention` registered with transformers' ``AttentionInterface``,
exchanges heads for sequence (``mm_kernels.parallel.cp_attention``) so each rank attends over the
whole causal sequence. The output (logits) stays split; the trainer gathers per-token losses.

Cutting the input with a plain slice is enough for exact gradients: the tower and the embedding run
whole on every CP rank, each rank's backward reaches them through its piece only, and the gradient
reduction over ranks adds the pieces up (the trainer scales the loss as for the text decoder).

The same hook keeps FSDP2's collectives in step when a micro-batch holds no image: the vision tower
then runs on a blank image and enters the result with weight 0, so every rank all-gathers (and
reduce-scatters) the tower's units at the same point of every step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mm_kernels.parallel import ULYSSES, CPGroups, cp_attention, shard_for_rank

ULYSSES_ATTENTION = "mm_kernels_ulysses"


class UlyssesAttention:
    """A transformers attention function: causal attention of this rank's queries [B, Hq, S/C, D] over
    the whole sequence, keys and values [B, Hkv, S/C, D] exchanged by Ulysses all-to-all; returns
    ([B, S/C, Hq, D], None). Right padding needs no mask under causal attention."""

    def __init__(self, groups: CPGroups) -> None:
        self.groups = groups

    def __call__(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
        if dropout:
            raise ValueError("context-parallel attention has no dropout: set attention_dropout to 0")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return cp_attention(q, k, v, ULYSSES, self.groups, causal=True, softmax_scale=scaling), None


def register_ulysses_attention(groups: CPGroups) -> str:
    """Registers :class:`UlyssesAttention` over ``groups`` with transformers; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ULYSSES_ATTENTION, UlyssesAttention(groups))
    return ULYSSES_ATTENTION


def _tensor_sum(output) -> Tensor:
    """The sum of every tensor in a model output (nested lists and tuples included)."""
    values = output.values() if hasattr(output, "values") else output
    total = torch.zeros(())
    for value in values:
        if isinstance(value, Tensor):
            total = total + value.float().sum()
        elif isinstance(value, (list, tuple)):
            total = total + _tensor_sum(value)
    return total


class TextModelEntry:
    """The forward pre-hook of a Qwen-VL text model (see the module doc).

    ``size`` / ``rank``: this rank's place in its CP group (size 1: no split). Before each forward the
    trainer sets ``blank_vision`` to True when the micro-batch has no image.
    """

    def __init__(self, model: nn.Module, size: int = 1, rank: int = 0) -> None:
        self.inner = model.model
        self.size, self.rank = size, rank
        self.blank_vision = False
        vision = model.config.vision_config
        merge = vision.spatial_merge_size
        self._blank_grid = torch.tensor([[1, merge, merge]])
        self._blank_patches = merge * merge
        self._blank_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        self.handle = self.inner.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def _piece(self, x: Tensor, dim: int) -> Tensor:
        return shard_for_rank(x, ULYSSES, self.size, self.rank, self.size, dim)

    def _blank_vision_term(self, like: Tensor) -> Tensor:
        pixels = torch.zeros(self._blank_patches, self._blank_dim, device=like.device)
        output = self.inner.visual(pixels, grid_thw=self._blank_grid.to(like.device))
        return 0.0 * _tensor_sum(output).to(like.device, like.dtype)

    def _split(self, kwargs: dict) -> None:
        embeds = kwargs["inputs_embeds"]
        if embeds.shape[1] % self.size:
            raise ValueError(f"sequence length {embeds.shape[1]} is not a multiple of the CP size {self.size}")
        kwargs["inputs_embeds"] = self._piece(embeds, 1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            kwargs["position_ids"] = self._piece(positions, positions.ndim - 1)
        kwargs["attention_mask"] = None
        visual = kwargs.get("visual_pos_masks")
        if visual is not None:
            rows = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
            rows[visual] = torch.arange(int(visual.sum()), device=visual.device)
            local = self._piece(rows, 1)
            kept = local[local >= 0]
            kwargs["visual_pos_masks"] = local >= 0
            kwargs["deepstack_visual_embeds"] = [embeds_[kept] for embeds_ in kwargs["deepstack_visual_embeds"]]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.blank_vision:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + self._blank_vision_term(kwargs["inputs_embeds"])
        if self.size > 1:
            self._split(kwargs)
        return args, kwargs
