"""Drop-in fused kernels for Hugging Face transformers models (needs ``pip install 'mm-kernels[hf]'``).

One model::

    from mm_kernels.integrations.transformers import apply_fused_kernels
    report = apply_fused_kernels(model)          # rms_norm=True, swiglu=True, moe_permute=True, strict=False
    print(report)                                # what was swapped, what was left alone and why
    report.undo()

Every model a model type builds::

    from mm_kernels.integrations.transformers import fuse_model_type
    with fuse_model_type("qwen2_5_vl") as patch:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    print(patch.reports[0])

Supported model types and classes: ``registry.SUPPORTED``. How each module kind is fused:
``kinds``. The equivalence probe run before any swap: ``probe``.
"""

from mm_kernels.integrations.transformers.patch import (
    FusedKernelMismatchError,
    FusedKernelReport,
    ModelTypePatch,
    apply_fused_kernels,
    fuse_model_type,
    fused_kind,
)
from mm_kernels.integrations.transformers.registry import SUPPORTED

__all__ = [
    "SUPPORTED",
    "FusedKernelMismatchError",
    "FusedKernelReport",
    "ModelTypePatch",
    "apply_fused_kernels",
    "fuse_model_type",
    "fused_kind",
]
