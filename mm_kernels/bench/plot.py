"""PNG bar chart of benchmark speedups (needs matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Sequence

from mm_kernels.bench.harness import BenchResult


def plot_speedups(results: Sequence[BenchResult], path: str) -> None:
    """Writes one pair of bars (x eager, x torch.compile) per result to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.kernel} {r.mode}\n{r.shape} {r.dtype}" for r in results]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(results)), 4.5))
    ax.bar([x - 0.2 for x in xs], [r.speedup_vs_eager for r in results], width=0.4, label="vs eager")
    ax.bar([x + 0.2 for x in xs], [r.speedup_vs_compile or 0.0 for r in results], width=0.4,
           label="vs torch.compile")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("speedup (higher is better)")
    ax.set_title("mm-kernels: speedup over PyTorch references")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
