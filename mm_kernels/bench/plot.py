"""PNG bar chart of benchmark speedups (needs matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Sequence

from mm_kernels.bench.harness import BenchResult


def plot_speedups(results: Sequence[BenchResult], path: str) -> None:
    """Writes one group of bars per result to ``path``: x eager, x torch.compile and, when measured, x Liger."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("vs eager", [r.speedup_vs_eager for r in results]),
              ("vs torch.compile", [r.speedup_vs_compile or 0.0 for r in results])]
    if any(r.speedup_vs_liger is not None for r in results):
        series.append(("vs Liger-Kernel", [r.speedup_vs_liger or 0.0 for r in results]))
    labels = [f"{r.kernel} {r.mode}\n{r.shape} {r.dtype}" for r in results]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(results)), 4.5))
    for i, (name, values) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(results))], values, width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(range(len(results))), labels, fontsize=7)
    ax.set_ylabel("speedup (higher is better)")
    ax.set_title("mm-kernels: speedup over the baselines")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
