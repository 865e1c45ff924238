"""A tiny transformer language model for trainer-level tests (fp32, CPU, deterministic)."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class ToyBlock(nn.Module):
    """Pre-norm block: causal self-attention and a GELU MLP, both residual. x: [batch, seq, hidden]."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.linear_proj = nn.Linear(hidden, hidden)
        self.mlp_norm = nn.LayerNorm(hidden)
        self.linear_fc1 = nn.Linear(hidden, 4 * hidden)
        self.linear_fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.linear_proj(attn.transpose(1, 2).reshape(batch, seq, hidden))
        return x + self.linear_fc2(F.gelu(self.linear_fc1(self.mlp_norm(x))))


class ToyTransformer(nn.Module):
    """Token + position embeddings, ``layers`` ToyBlocks, final norm, untied output head.

    tokens: int64 [batch, seq] -> logits fp32 [batch, seq, vocab].
    """

    def __init__(self, vocab: int = 64, hidden: int = 32, heads: int = 4, layers: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(seq, hidden)
        self.layers = nn.ModuleList(ToyBlock(hidden, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(hidden)
        self.output_layer = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            x = layer(x)
        return self.output_layer(self.final_norm(x))


def keyed_full_value(seed: int):
    """Full value of each toy parameter keyed by (seed, name): biases 0, other 1-D weights 1,
    matrices N(0, 0.02). For mm_train.model.init.init_parameters_."""

    def full_value(name: str, shape: torch.Size) -> torch.Tensor:
        if name.endswith("bias"):
            return torch.zeros(shape)
        if len(shape) == 1:
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=generator) * 0.02

    return full_value


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (token mean) of ``model`` on int64 ``tokens`` [batch, seq + 1]."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _arithmetic_tokens(starts: torch.Tensor, strides: torch.Tensor, seq: int, vocab: int) -> torch.Tensor:
    return (starts[:, None] + strides[:, None] * torch.arange(seq + 1)) % vocab


def keyed_batch(step: int, batch: int = 4, seq: int = 16, vocab: int = 64) -> torch.Tensor:
    """Global batch of step ``step``: int64 [batch, seq + 1] arithmetic sequences (learnable, so
    the loss falls), drawn from a generator keyed by the step."""
    generator = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(vocab, (batch,), generator=generator)
    return _arithmetic_tokens(starts, torch.randint(1, 4, (batch,), generator=generator), seq, vocab)


def global_rng_batch(step: int, batch: int = 4, seq: int = 16, vocab: int = 64) -> torch.Tensor:
    """Like :func:`keyed_batch` but drawn from the global torch RNG (resuming needs its state)."""
    return _arithmetic_tokens(torch.randint(vocab, (batch,)), torch.randint(1, 4, (batch,)), seq, vocab)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, batch_for_step,
          scheduler=None, rank: int = 0, world_size: int = 1, after_step=None) -> list[float]:
    """Runs ``steps`` of data-parallel training; returns the global-batch loss of each step.

    Each rank takes its contiguous share of the global batch; the reported loss is the mean
    over ranks (= the single-process loss on the whole batch). ``after_step(step)`` runs after
    each optimizer step (e.g. to save a checkpoint).
    """
    losses = []
    for step in steps:
        tokens = batch_for_step(step).chunk(world_size)[rank]
        loss = lm_loss(model, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        reported = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(reported)
        losses.append(reported.item() / world_size)
        if after_step is not None:
            after_step(step)
    return losses
