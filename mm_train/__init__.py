"""mm_train: a thin Megatron-core GPT trainer with MindSpeed-MM style flags and the mm_kernels fused ops."""
