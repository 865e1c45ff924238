"""CPU backend: thin wrappers over the C++ operators in ``torch.ops.mm_kernels_cpu``."""
