"""megatron-core core attention on mm_kernels' fused attention (:func:`mm_kernels.ops.attention.flash_attention`).

:class:`MegatronFlashAttention` takes the place of megatron-core's ``DotProductAttention`` in a layer
spec (:func:`mm_kernels.integrations.megatron.core_attention_spec`), with its constructor and
forward: query [sq, b, np, hn], key/value [sk, b, ng, hn] (this TP rank's heads, ng dividing np) ->
context [sq, b, np * hn]. It computes what megatron's attention computes, without the [b, np, sq, sk]
scores: no K/V heads repeated for grouped-query attention, softmax statistics in fp32 inside the
kernel, no casts.

- Masks, by the mask type (the layer's or the one passed to forward): ``causal`` and
  ``padding_causal`` hide later keys, and a given ``attention_mask`` (bool, True: hidden,
  [b | 1, 1, sq | 1, sk]) hides more; ``padding`` / ``arbitrary`` use the mask alone; ``no_mask``
  none. A query that sees no key gets a zero context (megatron's softmax would average every value).
- Dropout of the probabilities as megatron's: ``config.attention_dropout`` (or the constructor's
  ``attention_dropout``) while training, its seed drawn inside megatron's RNG tracker fork unless
  sequence parallelism is on, so each TP rank drops differently and activation recomputation
  replays the same mask.
- ``softmax_scale`` defaults to 1 / sqrt(hn); query-key layer scaling cancels out (it only protects
  fp16 scores, which stay fp32 here).
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from mm_kernels.ops.attention import flash_attention

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


def megatron_mask(attention_mask: Tensor) -> Tensor:
    """megatron's attention mask (bool, True: hidden, [b | 1, 1, sq | 1, sk]) as flash_attention's
    [b | 1, sq | 1, sk] (a view); ValueError/TypeError naming what is wrong."""
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"attention_mask must be a bool tensor (True: hidden), got {attention_mask.dtype}")
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise ValueError(f"attention_mask must have shape [b, 1, sq, sk] (one mask for all heads), got "
                         f"{tuple(attention_mask.shape)}")
    return attention_mask[:, 0]


class MegatronFlashAttention(MegatronModule):
    """Core attention for megatron-core's layer spec on mm_kernels' fused attention (see the module doc)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("MegatronFlashAttention runs on whole sequences (context_parallel_size 1); with "
                             "context parallelism use mm_kernels.parallel.cp_attention")
        if config.window_size is not None:
            raise ValueError("MegatronFlashAttention does not support sliding-window attention (window_size)")
        if config.softmax_type != "vanilla":
            raise ValueError(f"MegatronFlashAttention supports softmax_type 'vanilla', got {config.softmax_type!r}")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        """Context [sq, b, np * hn] of query [sq, b, np, hn] over key/value [sk, b, ng, hn]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("MegatronFlashAttention takes no attention bias or packed sequences")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask = None
        if attention_mask is not None and mask_type != AttnMaskType.no_mask:
            mask = megatron_mask(attention_mask)
        dropout_p = self.dropout_p if self.training else 0.0
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))
        forked = dropout_p and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if forked else contextlib.nullcontext():
            out = flash_attention(q, k, v, causal=mask_type in _CAUSAL_TYPES, softmax_scale=self.softmax_scale,
                                  mask=mask, dropout_p=dropout_p)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)

