"""Helpers for distributed tests: spawned gloo groups with timeouts (see ``mm_kernels.parallel.spawn``)."""

from mm_kernels.parallel.spawn import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
