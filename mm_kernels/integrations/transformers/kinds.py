"""The kinds of Hugging Face modules mm_kernels can fuse: what each computes and when it applies.

A kind is a fused ``forward`` that replaces the forward of one module instance (the module, its
class and its parameters stay as they are), a check that says why an instance cannot take it, and
the random inputs the equivalence probe feeds both forwards.

- ``rms_norm``: Llama-style RMSNorm (``weight * normalize(x.float()).to(x.dtype)``,
  ``variance_epsilon``) -> :func:`mm_kernels.rms_norm` with ``casting="llama"``.
- ``gemma_rms_norm``: Gemma-style RMSNorm (``(normalize(x.float()) * (1 + weight.float())).type_as(x)``,
  ``eps``) -> :func:`mm_kernels.rms_norm` with ``casting="gemma", offset=1.0``.
- ``swiglu_mlp``: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a SiLU ``act_fn`` ->
  the same projections around :func:`mm_kernels.swiglu_pair`.
- ``moe_experts``: transformers' expert collections (``gate_up_proj`` [E, 2I, H], ``down_proj``
  [E, H, I], called with ``(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])``) ->
  :func:`mm_kernels.moe_permute`, grouped matmuls, :func:`mm_kernels.swiglu` and
  :func:`mm_kernels.moe_unpermute` (the weighted sum over each token's experts in fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm_kernels import moe_permute, moe_unpermute, rms_norm, swiglu, swiglu_pair


def _rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    """Llama RMSNorm; a weight of another dtype than the input keeps the original (promoting) arithmetic."""
    if self.weight.dtype != hidden_states.dtype:
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, casting="llama")


def _gemma_rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    """Gemma RMSNorm: fp32 throughout with the weight used as 1 + weight, one rounding to the input dtype."""
    return rms_norm(hidden_states, self.weight, self.eps, casting="gemma", offset=1.0)


def _swiglu_mlp_forward(self, hidden_states: Tensor) -> Tensor:
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with the gating fused."""
    return self.down_proj(swiglu_pair(self.gate_proj(hidden_states), self.up_proj(hidden_states)))


def _grouped_mm_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: CPU, or bf16 on CUDA sm80+; contiguous weights, rows of
    16-byte multiples and 16-byte aligned data, one dtype (autocast does not reach grouped_mm); bf16 under
    torch.compile. Else the per-expert loop runs."""
    if not hasattr(F, "grouped_mm") or x.device.type not in ("cpu", "cuda") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cuda" and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0)):
        return False
    row_bytes = (x.shape[-1] * x.element_size(), weight.shape[-2] * weight.element_size())
    if not (weight.is_contiguous() and all(size % 16 == 0 for size in row_bytes)):
        return False
    if torch.compiler.is_compiling():
        return x.dtype == torch.bfloat16
    return x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """Per-expert linear layers over expert-major rows.

    x [N, in] (rows of expert e follow those of e - 1), weight [E, out, in], counts [E] int (rows per
    expert, summing to N) -> [N, out] in x.dtype; rows of expert e are multiplied by weight[e].T.
    """
    if _grouped_mm_fits(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=counts.cumsum(0, dtype=torch.int32))
    return torch.cat([rows @ w.T for rows, w in zip(x.split(counts.tolist()), weight, strict=True)])


def _moe_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H] in hidden_states.dtype."""
    num_experts = self.gate_up_proj.shape[0]
    permuted, sorted_indices = moe_permute(hidden_states, top_k_index, num_experts=num_experts)
    flat = top_k_index.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    hidden = swiglu(grouped_linear(permuted, self.gate_up_proj, counts), dim=-1)
    hidden = grouped_linear(hidden, self.down_proj, counts)
    return moe_unpermute(hidden, sorted_indices, top_k_weights).to(hidden_states.dtype)


def _is_silu(act: object) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, (nn.SiLU, SiLUActivation))


def _activation_reason(act: object) -> str | None:
    if _is_silu(act):
        return None
    return f"activation {type(act).__name__} is not SiLU (SwiGLU does not apply)"


def _check_rms_norm(module: nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        return "no 1-D weight"
    return None


def _check_swiglu_mlp(module: nn.Module) -> str | None:
    missing = [name for name in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(module, name)]
    if missing:
        return f"no {', '.join(missing)}"
    return _activation_reason(module.act_fn)


def _check_moe_experts(module: nn.Module) -> str | None:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == 3 and down.dim() == 3):
        return "no 3-D gate_up_proj / down_proj expert weights"
    layout = {"has_gate": True, "is_concatenated": True, "is_transposed": False, "has_bias": False,
              "has_post_expert_norm": False, "_is_expert_parallel": False}
    for name, wanted in layout.items():
        if getattr(module, name, wanted) != wanted:
            return f"{name}={not wanted} is not supported"
    experts, hidden = gate_up.shape[0], gate_up.shape[2]
    if gate_up.shape[1] % 2 or down.shape != (experts, hidden, gate_up.shape[1] // 2):
        return f"expert weights gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} are not [E, 2I, H] / [E, H, I]"
    return _activation_reason(module.act_fn)


def _rows_input(width: int, dtype: torch.dtype, generator: torch.Generator) -> tuple[Tensor, ...]:
    return (torch.randn(2, 5, width, generator=generator).to(dtype),)


def _norm_inputs(module: nn.Module, dtype: torch.dtype, generator: torch.Generator) -> tuple[Tensor, ...]:
    return _rows_input(module.weight.shape[0], dtype, generator)


def _mlp_inputs(module: nn.Module, dtype: torch.dtype, generator: torch.Generator) -> tuple[Tensor, ...]:
    return _rows_input(module.gate_proj.in_features, dtype, generator)


def _experts_inputs(module: nn.Module, dtype: torch.dtype, generator: torch.Generator) -> tuple[Tensor, ...]:
    experts, hidden = module.gate_up_proj.shape[0], module.gate_up_proj.shape[2]
    tokens, top_k = 12, min(2, experts)
    scores = torch.rand(tokens, experts, generator=generator)
    weights, index = scores.topk(top_k, dim=-1)
    return (torch.randn(tokens, hidden, generator=generator).to(dtype), index, (weights / weights.sum(-1, keepdim=True)).to(dtype))


@dataclass(frozen=True)
class Kind:
    """One fusable module kind (see the module docstring)."""

    name: str
    flag: str
    forward: Callable[..., Tensor]
    check: Callable[[nn.Module], str | None]
    probe_inputs: Callable[[nn.Module, torch.dtype, torch.Generator], tuple[Tensor, ...]]


KINDS = {kind.name: kind for kind in (
    Kind("rms_norm", "rms_norm", _rms_norm_forward, _check_rms_norm, _norm_inputs),
    Kind("gemma_rms_norm", "rms_norm", _gemma_rms_norm_forward, _check_rms_norm, _norm_inputs),
    Kind("swiglu_mlp", "swiglu", _swiglu_mlp_forward, _check_swiglu_mlp, _mlp_inputs),
    Kind("moe_experts", "moe_permute", _moe_experts_forward, _check_moe_experts, _experts_inputs),
)}
