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
