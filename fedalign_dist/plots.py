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
    """One line per method (mean over seeds) with a shaded +-std band; rounds without a value
    (not evaluated, eval.every > 1) are skipped, not drawn as gaps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (mean, std) in curves.items():
        m, s = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
        rounds = np.arange(1, len(m) + 1)
        keep = ~np.isnan(m)
        rounds, m, s = rounds[keep], m[keep], s[keep]
        ax.plot(rounds, m, marker="o", markersize=3, label=name)
        ax.fill_between(rounds, m - s, m + s, alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_stacked_bars(rows: dict[str, list[float]], parts: tuple[str, ...], path, xlabel: str, title: str = "") -> None:
    """One horizontal bar per row, split into `parts` (e.g. seconds per phase of a round)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    names = list(rows)
    left = np.zeros(len(names))
    for i, part in enumerate(parts):
        widths = np.array([rows[n][i] for n in names])
        ax.barh(names, widths, left=left, label=part)
        left += widths
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=len(parts), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lines(x: list[float], series: dict[str, list[float]], path, xlabel: str, ylabel: str, logy: bool = False,
               right: dict[str, list[float]] | None = None) -> None:
    """Lines against a common x axis (log scale, ticks at the measured x); `right` series go on a
    second y axis from 0."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:,}" for v in x])
    ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        twin = ax.twinx()
        for name, ys in right.items():
            twin.plot(x, ys, marker="s", linestyle="--", color="tab:red", label=name)
        twin.set_ylabel(", ".join(right))
        twin.set_ylim(0, 1.2 * max(max(ys) for ys in right.values()))
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
