"""Which transformers classes take which fused kind, per model type (transformers 5.x class names).

A module matches when its class, or a class it derives from, is listed here; the kind's check then
decides whether this instance fits (an MLP whose activation is not SiLU, say, is left alone).
"""

from __future__ import annotations

from torch import nn

# model_type -> {class name in transformers.models.<model_type>.modeling_<model_type>: kind name}
SUPPORTED: dict[str, dict[str, str]] = {
    "llama": {"LlamaRMSNorm": "rms_norm", "LlamaMLP": "swiglu_mlp"},
    "mistral": {"MistralRMSNorm": "rms_norm", "MistralMLP": "swiglu_mlp"},
    "qwen2": {"Qwen2RMSNorm": "rms_norm", "Qwen2MLP": "swiglu_mlp"},
    "qwen3": {"Qwen3RMSNorm": "rms_norm", "Qwen3MLP": "swiglu_mlp"},
    "qwen3_moe": {"Qwen3MoeRMSNorm": "rms_norm", "Qwen3MoeMLP": "swiglu_mlp", "Qwen3MoeExperts": "moe_experts"},
    "mixtral": {"MixtralRMSNorm": "rms_norm", "MixtralExperts": "moe_experts"},
    "gemma": {"GemmaRMSNorm": "gemma_rms_norm", "GemmaMLP": "swiglu_mlp"},
    "gemma3": {"Gemma3RMSNorm": "gemma_rms_norm", "Gemma3MLP": "swiglu_mlp"},
    "qwen2_vl": {"Qwen2VLRMSNorm": "rms_norm", "Qwen2MLP": "swiglu_mlp"},
    "qwen2_5_vl": {"Qwen2_5_VLRMSNorm": "rms_norm", "Qwen2_5_VLMLP": "swiglu_mlp", "Qwen2MLP": "swiglu_mlp"},
    "qwen3_vl": {"Qwen3VLTextRMSNorm": "rms_norm", "Qwen3VLTextMLP": "swiglu_mlp"},
    "qwen3_vl_moe": {"Qwen3VLMoeTextRMSNorm": "rms_norm", "Qwen3VLMoeTextMLP": "swiglu_mlp",
                     "Qwen3VLMoeTextExperts": "moe_experts"},
}

_BY_CLASS = {
    (f"transformers.models.{model_type}.modeling_{model_type}", class_name): kind
    for model_type, classes in SUPPORTED.items()
    for class_name, kind in classes.items()
}


def kind_name_for(module: nn.Module) -> str | None:
    """The kind listed for the module's class (or the nearest listed base class), else None."""
    for cls in type(module).__mro__:
        kind = _BY_CLASS.get((cls.__module__, cls.__qualname__))
        if kind is not None:
            return kind
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a norm, MLP or experts module of an unlisted class is left alone; None for any other module."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or "LayerNorm" in name:
        return "LayerNorm (mean-centred): mm_kernels fuses RMSNorm only"
    if "MLP" in name or "Mlp" in name:
        if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
            return f"gated MLP class {name} is not in the supported table"
        return "not a gated MLP (no gate_proj / up_proj): SwiGLU does not apply"
    if "Norm" in name or "Experts" in name:
        return f"class {name} is not in the supported table"
    return None
