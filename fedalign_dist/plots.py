"""PNG figures (matplotlib, headless)."""
from __future__ import annotations

import numpy as np


def plot_label_table(table: np.ndarray, label_names: list[str], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(label_names), 1 + 0.35 * len(table)))
    im = ax.imshow(table, aspect="auto", cmap="Blues")
    ax.set_xticks(range(len(label_names)), label_names, rotation=30, ha="right")
    ax.set_yticks(range(len(table)), [f"client {c}" for c in range(len(table))])
    for (row, col), value in np.ndenumerate(table):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > table.max() / 2 else "black")
    ax.set_title(title or "examples per client and label")
    fig.colorbar(im, ax=ax, label="train examples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rounds: list[int], series: dict[str, list[float | None]], path, ylabel: str, title: str = "") -> None:
    """One line per series against the round (missing values skipped)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in series.items():
        points = [(r, v) for r, v in zip(rounds, values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_routing_heatmap(usage: dict[str, list[list[float]]], path, title: str = "") -> None:
    """Rows: clients; columns: (layer, expert); colour: the client's routing probability."""
    plt = _pyplot()
    clients = sorted(usage, key=int)
    table = np.array([np.concatenate(usage[c]) for c in clients])
    layers, experts = len(usage[clients[0]]), len(usage[clients[0]][0])
    fig, ax = plt.subplots(figsize=(1.5 + 0.35 * table.shape[1], 1 + 0.35 * len(clients)))
    im = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(table.shape[1]), [f"L{l}E{e}" for l in range(layers) for e in range(experts)],
                  rotation=90, fontsize=7)
    ax.set_yticks(range(len(clients)), [f"client {c}" for c in clients], fontsize=7)
    ax.set_title(title or "routing distribution per client")
    fig.colorbar(im, ax=ax, label="mean routing probability")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_band_curves(curves: dict[str, tuple[list[float], list[float]]], path, ylabel: str, title: str = "") -> None:
    """One line per method (mean over seeds) with a shaded +-std band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (mean, std) in curves.items():
        rounds = np.arange(1, len(mean) + 1)
        m, s = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
        ax.plot(rounds, m, label=name)
        ax.fill_between(rounds, m - s, m + s, alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
