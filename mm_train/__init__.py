"""mm_train: a thin Megatron-core trainer with MindSpeed-MM style flags and the fused mm_kernels."""

from mm_train.platform.quiet import silence_fallback_warnings

silence_fallback_warnings()
