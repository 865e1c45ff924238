"""``python -m mm_kernels info``: backends, versions and the CPU features the kernels use."""

from __future__ import annotations

import argparse
import platform

import torch

import mm_kernels
from mm_kernels._extension import cpu_extension, cpu_extension_error
from mm_kernels.dispatch import backends


def info_lines() -> list[str]:
    """Human-readable report of what mm_kernels can run on this machine."""
    lines = [
        f"mm_kernels {mm_kernels.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}",
    ]
    for name, available in backends().items():
        lines.append(f"  backend {name:<10} {'available' if available else 'unavailable'}")
    ext = cpu_extension()
    if ext is not None:
        lines.append(f"cpu kernels: {ext.selected_isa()}, OpenMP {'on' if ext.openmp else 'off'}, "
                     f"{torch.get_num_threads()} threads")
    else:
        lines.append(f"cpu kernels: not loaded ({cpu_extension_error()}); CPU tensors run the reference")
    lines.append(f"torch cpu capability: {torch.backends.cpu.get_cpu_capability()}")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed (pip install 'mm-kernels[gpu]')")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mm_kernels")
    parser.add_argument("command", choices=["info"])
    parser.parse_args(argv)
    print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
