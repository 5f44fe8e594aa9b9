"""Markdown tables for the generated reports (run summary, benchmark results, systems)."""
from __future__ import annotations


def table(header: list[str], rows: list[list]) -> list[str]:
    """Lines of a markdown table; cells are written with str()."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
