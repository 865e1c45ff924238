"""mm-kernels: fused training kernels for large (multimodal) transformers.

Each op runs on one of four backends (reference PyTorch, C++ CPU, Triton, torch_npu),
picked from the input's device; ``MM_KERNELS_BACKEND`` or :func:`use_backend` forces one.
"""

from mm_kernels.dispatch import backends, use_backend
from mm_kernels.ops.moe import (
    moe_permute,
    moe_permute_with_routing_map,
    moe_unpermute,
    moe_unpermute_with_routing_map,
)
from mm_kernels.ops.rms_norm import add_rms_norm, rms_norm, rms_norm_with_rstd
from mm_kernels.ops.swiglu import swiglu, swiglu_pair

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "add_rms_norm",
    "backends",
    "moe_permute",
    "moe_permute_with_routing_map",
    "moe_unpermute",
    "moe_unpermute_with_routing_map",
    "rms_norm",
    "rms_norm_with_rstd",
    "swiglu",
    "swiglu_pair",
    "use_backend",
]
