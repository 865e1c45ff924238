"""nn.Module drop-ins that run the fused kernels."""

from mm_kernels.nn.rms_norm import FusedRMSNorm

__all__ = ["FusedRMSNorm"]
