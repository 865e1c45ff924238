"""nn.Module drop-ins built on the fused ops."""

from mm_kernels.nn.mlp import SwiGLUMLP

__all__ = ["SwiGLUMLP"]
