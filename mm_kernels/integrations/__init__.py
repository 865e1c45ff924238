"""Integrations that swap framework modules for mm_kernels ops (megatron-core, Hugging Face)."""
