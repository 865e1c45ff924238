"""Microbenchmarks: one module per kernel (``KERNEL`` name + ``cases()``), a harness and the mm-bench CLI."""
