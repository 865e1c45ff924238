"""mm_train: a thin Megatron-core trainer with MindSpeed-MM style flags and the fused mm_kernels."""
