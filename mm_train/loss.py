"""The three loss normalisations of MindSpeed-MM, as megatron-core loss functions.

A loss function gets the per-token cross entropy [b, s] of one micro-batch and returns
(value, divisor, report); megatron-core divides value by divisor and by the number of
micro-batches unless ``calculate_per_token_loss`` is set, and averages gradients over DP.

- default: token mean within the micro-batch (value = sum over valid tokens, divisor = their count).
- ``--calculate-per-sample-loss``: token mean within each sample, then mean over samples
  (divisor = samples in the micro-batch; every micro-batch holds the same number).
- ``--calculate-per-token-loss``: sum over all valid tokens of the global batch divided by the
  global token count; megatron scales the gradients after the DP all-reduce.

``report`` is [numerator, denominator] of the objective, summed over micro-batches and DP ranks
for the logged ``lm loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

LOSS_MODES = ("token_mean", "per_sample", "per_token")


def micro_batch_loss(mode: str, loss_mask: torch.Tensor, token_loss: torch.Tensor):
    """(value, divisor int tensor, {"lm loss": [numerator, denominator]}) for one micro-batch.

    token_loss [b, s] float, loss_mask [b, s] (1 on tokens that count).
    """
    mask = loss_mask.to(torch.float32)
    losses = token_loss.float() * mask
    if mode == "per_sample":
        sample_means = losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        value = sample_means.sum()
        divisor = torch.tensor(mask.shape[0], dtype=torch.int, device=mask.device)
        report = torch.stack([value.detach(), divisor.float()])
    else:
        value = losses.sum()
        divisor = mask.sum().to(torch.int)
        if mode == "token_mean":
            report = torch.stack([value.detach() / divisor.clamp(min=1), torch.ones((), device=mask.device)])
        else:
            report = torch.stack([value.detach(), divisor.float()])
    return value, divisor, {"lm loss": report}


def loss_function(mode: str, loss_mask: torch.Tensor) -> Callable:
    """The megatron-core loss_func for a micro-batch with ``loss_mask`` [b, s]."""
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
    return partial(micro_batch_loss, mode, loss_mask)
