"""Triton backend (CUDA GPUs, Ascend through triton-ascend, any device under TRITON_INTERPRET=1)."""
