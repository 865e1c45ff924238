"""nn.Module drop-ins built on the fused ops."""

from mm_kernels.nn.mlp import SwiGLUMLP
from mm_kernels.nn.rms_norm import FusedRMSNorm

__all__ = ["FusedRMSNorm", "SwiGLUMLP"]
