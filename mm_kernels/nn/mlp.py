"""SwiGLU MLP: one fused gate_up projection, the fused swiglu, then the down projection.

A drop-in for the Llama / Qwen / Mistral MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))``.
``gate_up_proj.weight`` is [2F, H]: rows [0, F) are ``gate_proj.weight``, rows [F, 2F) are
``up_proj.weight`` (the Megatron ``linear_fc1`` layout with gated_linear_unit). ``load_state_dict``
accepts either layout: a Llama MLP state dict (``gate_proj.*``, ``up_proj.*``, ``down_proj.*``)
is fused on load, so ``mlp.load_state_dict(llama_mlp.state_dict())`` works as is;
:func:`split_gate_up_state_dict` converts back for saving in the Llama layout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mm_kernels.ops.swiglu import swiglu


def fuse_gate_up_state_dict(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Llama MLP keys -> SwiGLUMLP keys, in a new dict; other keys are kept.

    ``{prefix}gate_proj.weight`` [F, H] and ``{prefix}up_proj.weight`` [F, H] become
    ``{prefix}gate_up_proj.weight`` [2F, H] (gate rows first); biases likewise ([F] -> [2F]).
    """
    fused = dict(state_dict)
    _fuse_in_place(fused, prefix)
    return fused


def _fuse_in_place(state_dict: dict[str, Tensor], prefix: str) -> None:
    for name in ("weight", "bias"):
        gate_key, up_key = f"{prefix}gate_proj.{name}", f"{prefix}up_proj.{name}"
        if gate_key in state_dict and up_key in state_dict:
            gate, up = state_dict.pop(gate_key), state_dict.pop(up_key)
            state_dict[f"{prefix}gate_up_proj.{name}"] = torch.cat((gate, up), dim=0)


def split_gate_up_state_dict(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """SwiGLUMLP keys -> Llama MLP keys, in a new dict (the inverse of :func:`fuse_gate_up_state_dict`)."""
    split = dict(state_dict)
    for name in ("weight", "bias"):
        key = f"{prefix}gate_up_proj.{name}"
        if key in split:
            gate, up = split.pop(key).chunk(2, dim=0)
            split[f"{prefix}gate_proj.{name}"], split[f"{prefix}up_proj.{name}"] = gate, up
    return split


class SwiGLUMLP(nn.Module):
    """x [..., hidden] -> down_proj(swiglu(gate_up_proj(x))) [..., hidden].

    Parameters: ``gate_up_proj`` Linear(hidden -> 2 * ffn_hidden), ``down_proj`` Linear(ffn_hidden -> hidden),
    both with or without bias. Extra keyword arguments (``device``, ``dtype``) go to both Linears.
    """

    def __init__(self, hidden: int, ffn_hidden: int, bias: bool = False, **factory_kwargs) -> None:
        super().__init__()
        if hidden < 1 or ffn_hidden < 1:
            raise ValueError(f"hidden and ffn_hidden must be >= 1, got hidden={hidden}, ffn_hidden={ffn_hidden}")
        self.hidden, self.ffn_hidden = hidden, ffn_hidden
        self.gate_up_proj = nn.Linear(hidden, 2 * ffn_hidden, bias=bias, **factory_kwargs)
        self.down_proj = nn.Linear(ffn_hidden, hidden, bias=bias, **factory_kwargs)
        self.register_load_state_dict_pre_hook(_fuse_on_load)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x), dim=-1))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}"


def _fuse_on_load(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: fuses Llama gate_proj/up_proj entries in place."""
    _fuse_in_place(state_dict, prefix)
