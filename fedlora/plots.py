"""Plots of a finished run, drawn from its ``summary.json`` (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_accuracy"]


def plot_accuracy(summary: dict[str, Any], path: Path) -> Path:
    """Draw mean accuracy per round (global, personalized, local-only) and save it as PNG.

    The shaded band under each federated curve reaches down to its worst-10% clients.
    """
    import matplotlib  # noqa: PLC0415 - heavy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - heavy: matplotlib

    # Rounds without an evaluation (evaluate-every) have no point: the line joins the others.
    measured = [r for r in summary["rounds"] if r["global_accuracy"] == r["global_accuracy"]]
    rounds = [r["round"] for r in measured]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label, color in (
        ("personalized_accuracy", "personalized (global + personal)", "tab:green"),
        ("global_accuracy", "global adapter only", "tab:blue"),
    ):
        mean = [100 * r[key] for r in measured]
        worst = [100 * r[f"{key}_worst10"] for r in measured]
        ax.plot(rounds, mean, marker="o", color=color, label=label)
        ax.fill_between(rounds, worst, mean, color=color, alpha=0.12)
    local = summary["final"].get("local_only_accuracy")
    if local is not None:
        ax.axhline(100 * local, color="tab:gray", linestyle="--", label="local-only (no federation)")
    ax.set_xlabel("round")
    ax.set_ylabel("mean client accuracy (%)")
    ax.set_title("band: down to the worst 10% of clients", fontsize=9)
    ax.set_xticks(rounds)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
